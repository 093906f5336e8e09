//! `fleet-train gen-data`: a deterministic synthetic table of labelled short reviews, in English
//! and Korean, for the demo and the tests. The label follows from the sentiment words a text
//! contains (a signal a small model learns in a few epochs); filler words, quotes, commas and the
//! odd embedded line break exercise the CSV reader.

use std::io::Write;
use std::path::Path;

use super::data::SplitMix;

const POSITIVE: [&str; 12] = [
    "great",
    "wonderful",
    "excellent",
    "loved",
    "brilliant",
    "delightful",
    "좋은",
    "훌륭한",
    "최고의",
    "재미있는",
    "감동적인",
    "추천",
];
const NEGATIVE: [&str; 12] = [
    "terrible",
    "awful",
    "boring",
    "hated",
    "dreadful",
    "disappointing",
    "나쁜",
    "지루한",
    "최악의",
    "실망스러운",
    "형편없는",
    "별로",
];
const FILLER: [&str; 24] = [
    "the",
    "movie",
    "plot",
    "actors",
    "music",
    "ending",
    "scene",
    "story",
    "camera",
    "film",
    "it",
    "was",
    "and",
    "really",
    "quite",
    "a",
    "영화",
    "배우",
    "음악",
    "장면",
    "이야기",
    "정말",
    "그리고",
    "결말",
];

/// Writes `rows` rows of `id,text,label` (labels positive, negative, neutral) to `out`.
pub fn write(out: &Path, rows: usize, seed: u64) -> std::io::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = out.with_extension("csv.partial");
    let file = std::fs::File::create(&temporary)?;
    let mut writer = csv::Writer::from_writer(std::io::BufWriter::new(file));
    let mut rng = SplitMix::new(seed);
    writer.write_record(["id", "text", "label"])?;
    for id in 0..rows {
        let (label, text) = row(&mut rng);
        writer.write_record([id.to_string().as_str(), &text, label])?;
    }
    let mut inner = writer.into_inner().map_err(|e| e.into_error())?;
    inner.flush()?;
    inner.get_ref().sync_all()?;
    std::fs::rename(&temporary, out)
}

fn row(rng: &mut SplitMix) -> (&'static str, String) {
    const LABELS: [&str; 3] = ["positive", "negative", "neutral"];
    let label = LABELS[rng.below(3)];
    let mut words: Vec<String> = (0..4 + rng.below(8))
        .map(|_| FILLER[rng.below(FILLER.len())].to_string())
        .collect();
    let signal: &[&str] = match label {
        "positive" => &POSITIVE,
        "negative" => &NEGATIVE,
        _ => &[],
    };
    for _ in 0..signal.len().min(1 + rng.below(2)) {
        let at = rng.below(words.len() + 1);
        words.insert(at, signal[rng.below(signal.len())].to_string());
    }
    let mut text = words.join(" ");
    match rng.below(20) {
        0 => text = format!("\"{text}\", they said"),
        1 => text.push_str(",\nsecond line"),
        2 => text.push_str(", 그렇죠?"),
        _ => {}
    }
    // One row in fifty carries a random label, as real annotations do: accuracy tops out
    // near 0.99, not at 1.0.
    let label = if rng.below(50) == 0 {
        LABELS[rng.below(3)]
    } else {
        label
    };
    (label, text)
}

#[cfg(test)]
mod tests {
    use super::super::data::Dataset;

    #[test]
    fn same_seed_same_file_and_it_parses() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
        super::write(&a, 500, 1).unwrap();
        super::write(&b, 500, 1).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let data = Dataset::load(&a, "text", "label").unwrap();
        assert_eq!(data.len(), 500);
        assert_eq!(data.labels, ["negative", "neutral", "positive"]);
        assert!(data.texts.iter().any(|t| t.contains('\n')));
        assert!(data.texts.iter().any(|t| t.contains("영화")));
    }
}
