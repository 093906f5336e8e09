//! `fleet net` against the test bed with one host's link shaped to 100 Mbit/s (tbf on both
//! ends of its veth): every pair of hosts, and the master with each other host. It shapes the
//! test bed, so it has the bed alone (`Testbed::alone`).

use fleet_testkit as common;

use common::{Fleet, Restore, Testbed};
use fleet::netperf::{Model, ModelSize};
use serde_json::Value;

#[test]
fn a_shaped_link_is_measured_near_its_rate_and_the_others_far_above() {
    let tb = Testbed::alone();
    tb.control(&["shape", "host2", "100mbit"]);
    let _restore = Restore {
        tb: &tb,
        args: ["unshape", "host2"],
    };
    let run = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["--json", "net", "--seconds", "1", "--all-pairs"])
        .run();
    run.assert_code(0);
    let records = run.records();
    let links: Vec<&Value> = records.iter().filter(|r| r["type"] == "link").collect();
    let pairs: Vec<(&str, &str)> = links
        .iter()
        .map(|l| (l["from"].as_str().unwrap(), l["to"].as_str().unwrap()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("host1", "host2"),
            ("host2", "host1"),
            ("host1", "host3"),
            ("host3", "host1"),
            ("host2", "host3"),
            ("host3", "host2")
        ],
        "{}",
        run.stdout
    );
    for link in &links {
        let (from, to) = (link["from"].as_str().unwrap(), link["to"].as_str().unwrap());
        assert!(link["rtt_ms"].as_f64().unwrap() >= 0.0);
        // Alone, and with the other direction busy too.
        for field in ["mbit_per_s", "both_ways_mbit_per_s"] {
            let rate = link[field].as_f64().unwrap();
            if from == "host2" || to == "host2" {
                assert!(
                    (70.0..=130.0).contains(&rate),
                    "{from} -> {to}: {field} {rate}, shaped to 100"
                );
            } else {
                assert!(rate > 500.0, "{from} -> {to}: {field} {rate}, not shaped");
            }
        }
    }
    let slowest = links
        .iter()
        .map(|l| l["both_ways_mbit_per_s"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    let estimate = records
        .iter()
        .find(|r| r["type"] == "estimate")
        .expect("an estimate");
    assert_eq!(estimate["ranks"], 3);
    assert_eq!(estimate["bottleneck_mbit"].as_f64().unwrap(), slowest);
    // 109.5 M fp32 parameters over 3 ranks on ~100 Mbit/s: about 47 s per step, bf16 half.
    let fp32 = estimate["allreduce_fp32_ms"].as_f64().unwrap();
    assert!((30_000.0..70_000.0).contains(&fp32), "{estimate}");
    // bf16 moves half the bytes; the round trips (N-1 of them) stay: 2 x bf16 - fp32 is that
    // latency term, whatever round trip the shaped link had.
    let bf16 = estimate["allreduce_bf16_ms"].as_f64().unwrap();
    let latency = (3.0 - 1.0) * estimate["rtt_ms"].as_f64().unwrap();
    assert!((bf16 * 2.0 - fp32 - latency).abs() < 1.0, "{estimate}");
    // PowerSGD at ranks 16, 4 and 1 (BERT-base's shapes): fewer bytes and less time at each
    // lower rank, rank 4 over a hundred times fewer bytes than fp32; and the advice is the
    // estimate's for BERT-base on the measured link (on ~90 Mbit/s with 300 ms steps, four
    // micro-batches at rank 1).
    let rows = estimate["powersgd"].as_array().expect("PowerSGD rows");
    let field = |i: usize, name: &str| rows[i][name].as_f64().unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r["rank"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [16, 4, 1]
    );
    for i in 1..3 {
        assert!(
            field(i, "bytes_per_step") < field(i - 1, "bytes_per_step"),
            "{estimate}"
        );
        assert!(
            field(i, "allreduce_ms") < field(i - 1, "allreduce_ms"),
            "{estimate}"
        );
    }
    let params = estimate["params"].as_f64().unwrap();
    assert!(
        params * 4.0 / field(1, "bytes_per_step") > 100.0,
        "{estimate}"
    );
    assert!(field(1, "allreduce_ms") < fp32 / 50.0, "{estimate}");
    let expected = fleet::netperf::estimate(
        &ModelSize::Shapes(Model::bert_base()),
        3,
        slowest,
        estimate["rtt_ms"].as_f64().unwrap(),
        300.0,
    );
    assert_eq!(estimate["recommendation"], expected.recommendation.as_str());
    assert!(
        expected.recommendation.contains("--powersgd-rank"),
        "{estimate}"
    );

    // The table says the same.
    let table = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["net", "--seconds", "1"])
        .run();
    table.assert_code(0);
    for expected in [
        "POWERSGD-RANK",
        "MB/STEP",
        "recommended: ",
        "--powersgd-rank",
    ] {
        assert!(
            table.stdout.contains(expected),
            "{expected}: {}",
            table.stdout
        );
    }

    // `fleet check --net` ends with the same measurement and estimate.
    let check = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["--json", "check", "--net", "--seconds", "1"])
        .run();
    let records = check.records();
    assert!(
        records.iter().any(|r| r["type"] == "verdict"),
        "{}",
        check.stdout
    );
    // Without --all-pairs, the master with each other host.
    assert_eq!(
        records.iter().filter(|r| r["type"] == "link").count(),
        4,
        "{}",
        check.stdout
    );
    let estimate = records
        .iter()
        .find(|r| r["type"] == "estimate")
        .unwrap_or_else(|| panic!("no estimate: {}", check.stdout));
    let bottleneck = estimate["bottleneck_mbit"].as_f64().unwrap();
    assert!((70.0..=130.0).contains(&bottleneck), "{estimate}");
}
