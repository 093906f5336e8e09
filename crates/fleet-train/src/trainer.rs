//! The training run: data, tokenizer and model set up identically on every rank, then epochs of
//! sharded batches whose gradients are averaged over the ranks, validation, checkpoints, the
//! exported model and the summary line. Synchronous by design: one rank, one thread of control.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::json;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor, nn};

use super::checkpoint::{self, Latest};
use super::cli::{BackendChoice, DeviceChoice, Precision, TrainArgs, WireDtype};
use super::data::{self, Dataset, Split};
use super::ddp::{self, Backend};
use super::model::{self, BertClassifier, BertConfig, Preset};
use super::optim::{self, AdamW};
use super::powersgd::PowerSgd;
use super::rank::{Collective, Rank};
use super::tokenizer::TextEncoder;
use fleet_events::{self as events, Progress, Summary, TrainEvent, Validation, WorldChanged};

/// Trains on this rank; returns its summary, the line every rank prints last.
pub fn run(args: &TrainArgs, rank: &Rank) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let data_path = args.data.clone().context("--data is required")?;
    let device = device(args.device, rank)?;
    let backend = match (args.backend, device) {
        (BackendChoice::Gloo, _) => Backend::Gloo,
        (BackendChoice::Nccl, _) => Backend::Nccl,
        (BackendChoice::Auto, Device::Cuda(_)) => Backend::Nccl,
        (BackendChoice::Auto, _) => Backend::Gloo,
    };
    let mixed = matches!(args.precision, Precision::Bf16 | Precision::Fp16);
    let wire = match args.allreduce_dtype {
        WireDtype::Fp32 => None,
        WireDtype::Bf16 => Some(Kind::BFloat16),
        WireDtype::Fp16 => Some(Kind::Half),
    };
    let mut scaler = LossScale::new(args.precision == Precision::Fp16);
    if args.batch_size == 0 || args.grad_accum == 0 || args.epochs == 0 {
        bail!("--batch-size, --grad-accum and --epochs must be at least 1");
    }
    if !(0.0..1.0).contains(&args.val_fraction) {
        bail!("--val-fraction must be at least 0 and below 1");
    }

    let data = Dataset::load(&data_path, &args.text_column, &args.label_column)?;
    let split = Split::new(data.len(), args.val_fraction, args.seed);
    if split.train.len() < rank.world_size {
        bail!(
            "{} training rows cannot be shared by {} ranks",
            split.train.len(),
            rank.world_size
        );
    }

    let mut collective = Collective::connect(
        rank,
        backend,
        device,
        args.connect_timeout,
        args.timeout,
        (args.bucket_mb.max(0.0) * f64::from(1 << 20)) as usize,
    )?;
    agree_on_data(&mut collective, rank, &data)?;

    let train_texts: Vec<String> = split.train.iter().map(|&i| data.texts[i].clone()).collect();
    let (encoder, mut config) = match &args.model {
        Some(dir) => {
            let config = BertConfig::load(&dir.join("config.json"))?;
            (TextEncoder::load(dir, args.max_len)?, config)
        }
        None => {
            let encoder = TextEncoder::build(&train_texts, args.vocab_size, args.max_len)?;
            let preset = args.preset.unwrap_or(Preset::Tiny);
            let config = BertConfig::preset(
                preset,
                encoder.vocab_size() as i64,
                args.max_len.max(2) as i64,
            );
            (encoder, config)
        }
    };
    if let Some(dropout) = args.dropout {
        config.hidden_dropout_prob = dropout;
        config.attention_probs_dropout_prob = dropout;
        config.classifier_dropout = Some(dropout);
    }
    if args.max_len as i64 > config.max_position_embeddings {
        bail!(
            "--max-len {} is longer than the model's {} positions",
            args.max_len,
            config.max_position_embeddings
        );
    }

    tch::manual_seed(args.seed as i64);
    let mut vars = nn::VarStore::new(device);
    let model = BertClassifier::new(&vars.root(), config, data.labels.len() as i64);
    if let Some(dir) = &args.model {
        let report = model::load_weights(&vars, &dir.join("model.safetensors"))?;
        if rank.is_main() {
            event(TrainEvent::Model(events::Model {
                loaded: report.loaded as u64,
                initialised: report.fresh.clone(),
            }));
        }
    }
    if args.precision == Precision::Fp64 {
        vars.double();
    }
    let params = model::named_parameters(&vars);
    let mut optimizer = AdamW::new(&params, args.weight_decay);

    let resume = Resume::from(args);
    let (start_step, saved_world, saved_loss) = restore(
        args,
        rank,
        &collective,
        &params,
        &mut optimizer,
        resume,
        &data,
    )?;
    let grad_accum = accumulation_for(args.grad_accum, saved_world, rank);
    collective.broadcast(
        &params
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect::<Vec<_>>(),
    )?;
    let trained: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let powersgd = (args.powersgd_rank > 0).then(|| {
        let mut compressor = PowerSgd::new(
            &trained,
            args.powersgd_rank,
            args.powersgd_warmup_steps,
            wire,
        );
        compressor.steps = start_step;
        compressor
    });
    collective
        .reduce_gradients_of(&trained, wire, !args.no_overlap, powersgd)
        .map_err(|e| anyhow::anyhow!("preparing the gradient all-reduce: {e}"))?;
    if args.powersgd_rank > 0 && start_step > 0 {
        resume_powersgd(args, rank, &mut collective, resume, start_step, saved_world)?;
    }

    let ids = encoder.encode_all(&data.texts)?;
    let batches = Batches {
        ids: &ids,
        targets: &data.targets,
        pad: encoder.pad_id(),
        device,
    };

    let shard_len = split.train.len().div_ceil(rank.world_size);
    let micro_per_epoch = shard_len.div_ceil(args.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(grad_accum) as u64;
    let scheduled = steps_per_epoch * args.epochs;
    let total = scheduled.min(args.max_steps.unwrap_or(u64::MAX));
    let warmup = (scheduled as f64 * args.warmup).round() as u64;
    let peak_lr = args
        .lr
        .unwrap_or(if args.model.is_some() { 5e-5 } else { 1e-3 });
    let samples_per_step = (args.batch_size * grad_accum * rank.world_size) as f64;

    let checkpoint_every = args.checkpoint_every.unwrap_or(if max_restarts() > 0 {
        RESTARTABLE_EVERY
    } else {
        0
    });
    let mut step = start_step;
    let mut timing = Timing::default();
    // Loss sum, steps and seconds since the last progress report.
    let mut window = (0.0, 0u64, 0.0);
    let mut last = Evaluation::default();
    let mut train_loss = f64::NAN;
    let first_epoch = start_step / steps_per_epoch;
    for epoch in first_epoch..args.epochs {
        if step >= total {
            break;
        }
        let shard = data::shard(&split.train, epoch, args.seed, rank.rank, rank.world_size);
        let micro: Vec<&[usize]> = shard.chunks(args.batch_size).collect();
        let mut epoch_loss = (0.0, 0.0);
        for in_epoch in (step - epoch * steps_per_epoch) as usize..steps_per_epoch as usize {
            if step >= total {
                break;
            }
            let step_started = Instant::now();
            // Dropout masks depend only on the seed, the step and the rank: a resumed run draws
            // the same ones.
            tch::manual_seed(
                (args.seed.wrapping_mul(1_000_003)
                    + step * rank.world_size as u64
                    + rank.rank as u64) as i64,
            );
            let group =
                &micro[in_epoch * grad_accum..((in_epoch + 1) * grad_accum).min(micro.len())];
            let mut loss_sum = 0.0;
            for (i, rows) in group.iter().enumerate() {
                let (input, mask, targets) = batches.make(rows);
                let logits = if mixed {
                    ddp::autocast(device, args.precision == Precision::Fp16, || {
                        model.forward(&input, &mask, true)
                    })?
                    .to_kind(Kind::Float)
                } else {
                    model.forward(&input, &mask, true)
                };
                let loss = logits.cross_entropy_for_logits(&targets);
                if i + 1 == group.len() {
                    collective
                        .before_last_backward()
                        .map_err(|e| anyhow::anyhow!("preparing the gradient all-reduce: {e}"))?;
                }
                (&loss * (scaler.scale / group.len() as f64)).backward();
                loss_sum += loss.double_value(&[]);
            }
            if let Err(error) = collective.average_gradients() {
                return Err(collective.failure(
                    rank,
                    &format!("gradient all-reduce at step {}", step + 1),
                    error,
                ));
            }
            // Every rank holds the same averaged gradients, so every rank takes the same decision.
            let grads = optimizer.grads();
            if scaler.unscale(&grads) {
                optim::clip_grad_norm(&grads, args.max_grad_norm);
                optimizer
                    .step(optim::linear_schedule(step, warmup, scheduled, peak_lr))
                    .map_err(|e| anyhow::anyhow!("optimizer step {}: {e}", step + 1))?;
            }
            optimizer.zero_grad();
            step += 1;
            if let Device::Cuda(index) = device {
                tch::Cuda::synchronize(index as i64);
            }
            let seconds = step_started.elapsed().as_secs_f64();
            timing.add(seconds);
            window.2 += seconds;
            let loss = loss_sum / group.len() as f64;
            epoch_loss.0 += loss;
            epoch_loss.1 += 1.0;
            window.0 += loss;
            window.1 += 1;

            if step % args.log_every.max(1) == 0 || step == total {
                // The loss over every rank's rows since the last report, not rank 0's alone.
                let sums = collective
                    .sum(&[window.0, window.1 as f64])
                    .map_err(|e| collective.failure(rank, "summing the loss", e))?;
                if rank.is_main() {
                    event(TrainEvent::Progress(Progress {
                        epoch: epoch + 1,
                        epochs: args.epochs,
                        step,
                        steps: total,
                        loss: sums[0] / sums[1].max(1.0),
                        lr: optim::linear_schedule(step, warmup, scheduled, peak_lr),
                        samples_per_s: samples_per_step / timing.mean().max(1e-9),
                        step_ms: window.2 * 1000.0 / window.1.max(1) as f64,
                        eta_s: (total - step) as f64 * timing.mean(),
                    }));
                }
                window = (0.0, 0, 0.0);
            }
            if checkpoint_every > 0 && step % checkpoint_every == 0 && step < total {
                save_checkpoint(
                    args,
                    rank,
                    &collective,
                    &params,
                    &optimizer,
                    step,
                    &data,
                    train_loss,
                )?;
            }
        }
        let sums = collective
            .sum(&[epoch_loss.0, epoch_loss.1])
            .map_err(|e| collective.failure(rank, "summing the epoch's loss", e))?;
        train_loss = sums[0] / sums[1].max(1.0);
        last = evaluate(
            &model,
            &batches,
            &split.validation,
            rank,
            &collective,
            args.batch_size,
        )?;
        if rank.is_main() {
            event(TrainEvent::Validation(Validation {
                epoch: epoch + 1,
                step,
                train_loss,
                val_loss: last.loss,
                val_accuracy: last.accuracy,
                nothing_left: false,
            }));
        }
    }

    if start_step >= total {
        // Nothing was left to train: report what the checkpoint holds, measured again, not
        // the zeros of a loop that never ran.
        train_loss = saved_loss.unwrap_or(f64::NAN);
        last = evaluate(
            &model,
            &batches,
            &split.validation,
            rank,
            &collective,
            args.batch_size,
        )?;
        if rank.is_main() {
            event(TrainEvent::Validation(Validation {
                epoch: args.epochs,
                step,
                train_loss,
                val_loss: last.loss,
                val_accuracy: last.accuracy,
                nothing_left: true,
            }));
        }
    }
    save_checkpoint(
        args,
        rank,
        &collective,
        &params,
        &optimizer,
        step,
        &data,
        train_loss,
    )?;
    if rank.is_main() {
        export(&args.output, &model, &params, &encoder, &data.labels)?;
    }
    let params_sha256 = parameters_sha256(&params)?;
    let trained = timing.count > 0;
    let step_ms = trained.then(|| timing.mean() * 1000.0);
    Ok(Summary {
        rank: rank.rank as u64,
        world_size: rank.world_size as u64,
        host: rank.host.clone(),
        backend: backend.name().into(),
        device: format!("{device:?}").to_lowercase(),
        steps: step,
        epochs: args.epochs,
        params: params.iter().map(|(_, t)| t.numel() as u64).sum(),
        train_loss,
        val_loss: last.loss,
        val_accuracy: last.accuracy,
        steps_trained: timing.count,
        samples_per_s: trained.then(|| samples_per_step / timing.mean().max(1e-9)),
        step_ms,
        comm_fraction: collective.comm_seconds / timing.total.max(1e-9),
        comm_ms: collective.comm_seconds * 1000.0 / timing.count.max(1) as f64,
        wait_ms: collective.wait_seconds * 1000.0 / timing.count.max(1) as f64,
        overlap: !args.no_overlap,
        overlapped: collective.buckets_overlapped as f64 / collective.buckets_reduced.max(1) as f64,
        buckets: collective.buckets() as u64,
        compression: match (collective.powersgd_rank(), args.allreduce_dtype) {
            (Some(_), _) => "powersgd",
            (None, WireDtype::Fp32) => "none",
            (None, WireDtype::Bf16) => "bf16",
            (None, WireDtype::Fp16) => "fp16",
        }
        .into(),
        powersgd_rank: collective.powersgd_rank().unwrap_or(0) as u64,
        comm_bytes_per_step: collective.comm_bytes / timing.count.max(1),
        params_sha256,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Prints one event line on stdout.
pub fn event(event: TrainEvent) {
    println!("{}", event.line());
}

/// Checkpoint interval (steps) when fleet restarts the job on failure and none was given.
const RESTARTABLE_EVERY: u64 = 50;

/// `fleet run --max-restarts N` tells every rank N, so that it checkpoints as it goes.
fn max_restarts() -> u64 {
    std::env::var("FLEET_MAX_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn restart_count() -> u64 {
    std::env::var("FLEET_RESTART_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn device(choice: DeviceChoice, rank: &Rank) -> anyhow::Result<Device> {
    let cuda = tch::Cuda::is_available();
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto if !cuda => Ok(Device::Cpu),
        DeviceChoice::Cuda if !cuda => {
            bail!("--device cuda, but CUDA is not available on this host")
        }
        _ => {
            let count = tch::Cuda::device_count() as usize;
            if rank.local_rank >= count {
                bail!(
                    "LOCAL_RANK={} but this host has {count} CUDA devices",
                    rank.local_rank
                );
            }
            Ok(Device::Cuda(rank.local_rank))
        }
    }
}

/// Every rank must train on the same bytes with the same labels: the seed's "the data differs
/// between PCs" caught before the first step, naming the rank and host.
fn agree_on_data(collective: &mut Collective, rank: &Rank, data: &Dataset) -> anyhow::Result<()> {
    let labels = hex::encode(Sha256::digest(data.labels.join("\n").as_bytes()));
    let all = collective.exchange(rank, "data", &format!("{} {labels}", data.sha256))?;
    let fields = |s: &str| {
        s.split_once(' ')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap_or_default()
    };
    let (sha0, labels0) = fields(&all[0]);
    for (r, theirs) in all.iter().enumerate().skip(1) {
        let (sha, labels) = fields(theirs);
        if sha != sha0 {
            bail!(
                "data differs on {}: sha256 {sha} vs {sha0} on {}",
                collective.who(r),
                collective.who(0)
            );
        }
        if labels != labels0 {
            bail!(
                "the label map differs on {} from {}'s",
                collective.who(r),
                collective.who(0)
            );
        }
    }
    Ok(())
}

/// After a restart on fewer (or more) ranks, keeps the global batch by changing the micro-batches
/// per step where the new world size divides it, and says so; otherwise says that it changes.
fn accumulation_for(grad_accum: usize, saved_world: usize, rank: &Rank) -> usize {
    if saved_world == 0 || saved_world == rank.world_size {
        return grad_accum;
    }
    let total = saved_world * grad_accum;
    let kept = total % rank.world_size == 0;
    let adjusted = if kept {
        total / rank.world_size
    } else {
        grad_accum
    };
    if rank.is_main() {
        event(TrainEvent::WorldChanged(WorldChanged {
            from: saved_world as u64,
            to: rank.world_size as u64,
            grad_accum: adjusted as u64,
            global_batch_kept: kept,
        }));
    }
    adjusted
}

/// Loads the last checkpoint on rank 0 and hands its step, weights and optimizer state to every
/// rank. Returns the step to continue from (0: a fresh start) and the world size the checkpoint
/// was made with (0: none).
fn restore(
    args: &TrainArgs,
    rank: &Rank,
    collective: &Collective,
    params: &[(String, Tensor)],
    optimizer: &mut AdamW,
    resume: Resume,
    data: &Dataset,
) -> anyhow::Result<(u64, usize, Option<f64>)> {
    let mut step = 0i64;
    let mut saved_world = 0i64;
    let mut saved_loss = None;
    let dir = resume.dir(args).to_path_buf();
    if resume != Resume::No && rank.is_main() {
        match checkpoint::load(&dir)? {
            None => event(TrainEvent::Resume(events::Resume {
                found: false,
                step: 0,
                dir: dir.display().to_string(),
                other_job: None,
            })),
            // A restart continues its own job only: a checkpoint another job left in a shared
            // folder would hand it that job's model.
            Some((latest, _)) if resume == Resume::Restart && latest.run_id != run_id() => {
                event(TrainEvent::Resume(events::Resume {
                    found: false,
                    step: latest.step,
                    dir: dir.display().to_string(),
                    other_job: latest.run_id.clone(),
                }))
            }
            Some((latest, tensors)) => {
                if latest.data_sha256 != data.sha256 {
                    bail!(
                        "the checkpoint in {} was made with other data (sha256 {})",
                        dir.display(),
                        latest.data_sha256
                    );
                }
                let saved: std::collections::HashMap<String, Tensor> =
                    tensors.into_iter().collect();
                let mut targets: Vec<(String, Tensor)> = params
                    .iter()
                    .map(|(n, t)| (format!("model.{n}"), t.shallow_clone()))
                    .collect();
                targets.extend(optimizer.state());
                tch::no_grad(|| -> anyhow::Result<()> {
                    for (name, target) in &targets {
                        let source = saved.get(name).with_context(|| {
                            format!("the checkpoint in {} has no {name}", dir.display())
                        })?;
                        if source.size() != target.size() {
                            bail!(
                                "the checkpoint's {name} has another shape: was the model changed?"
                            );
                        }
                        target.shallow_clone().copy_(source);
                    }
                    Ok(())
                })?;
                step = latest.step as i64;
                saved_world = latest.world_size as i64;
                saved_loss = latest.train_loss;
                event(TrainEvent::Resume(events::Resume {
                    found: true,
                    step: step as u64,
                    dir: dir.display().to_string(),
                    other_job: None,
                }));
            }
        }
    }
    let shared = Tensor::from_slice(&[step, saved_world]).to_device(params[0].1.device());
    let loss =
        Tensor::from_slice(&[saved_loss.unwrap_or(f64::NAN)]).to_device(params[0].1.device());
    collective.broadcast(std::slice::from_ref(&shared))?;
    collective.broadcast(std::slice::from_ref(&loss))?;
    step = shared.int64_value(&[0]);
    saved_world = shared.int64_value(&[1]);
    saved_loss = Some(loss.double_value(&[0])).filter(|l| l.is_finite());
    if step > 0 {
        let state: Vec<Tensor> = optimizer.state().into_iter().map(|(_, t)| t).collect();
        collective.broadcast(&state)?;
        optimizer.set_steps(step);
    }
    Ok((step as u64, saved_world as usize, saved_loss))
}

/// Continues PowerSGD's error feedback and warm-started Q from the checkpoint at `step`, when
/// every rank finds its own state there (the same world); otherwise it starts afresh, said once.
fn resume_powersgd(
    args: &TrainArgs,
    rank: &Rank,
    collective: &mut Collective,
    resume: Resume,
    step: u64,
    saved_world: usize,
) -> anyhow::Result<()> {
    let saved = if saved_world == rank.world_size {
        checkpoint::load_rank_state(resume.dir(args), rank.rank, step)?
    } else {
        None
    };
    let continued = collective
        .restore_powersgd(saved)
        .map_err(|e| collective.failure(rank, "restoring PowerSGD's state", e))?;
    if !continued && rank.is_main() {
        eprintln!(
            "fleet-train: PowerSGD starts afresh at step {step}: not every rank has its state \
             from the checkpoint (the world changed from {saved_world} ranks, or a rank's was not written)"
        );
    }
    Ok(())
}

/// Whether, and why, a run continues from a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resume {
    No,
    /// `--resume` or `--resume-from`: the user names the checkpoint, whichever job wrote it.
    Asked,
    /// A restart of the job by fleet (FLEET_RESTART_COUNT > 0): its own checkpoints only.
    Restart,
}

impl Resume {
    fn from(args: &TrainArgs) -> Resume {
        if args.resume || args.resume_from.is_some() {
            Resume::Asked
        } else if restart_count() > 0 {
            Resume::Restart
        } else {
            Resume::No
        }
    }

    /// Where the checkpoint to continue from is.
    fn dir<'a>(&self, args: &'a TrainArgs) -> &'a Path {
        args.resume_from.as_deref().unwrap_or(&args.checkpoint_dir)
    }
}

/// The job this run belongs to, the same across fleet's restarts of it.
fn run_id() -> Option<String> {
    std::env::var("FLEET_RUN_ID")
        .ok()
        .filter(|id| !id.is_empty())
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    args: &TrainArgs,
    rank: &Rank,
    collective: &Collective,
    params: &[(String, Tensor)],
    optimizer: &AdamW,
    step: u64,
    data: &Dataset,
    train_loss: f64,
) -> anyhow::Result<()> {
    // PowerSGD's error feedback differs between ranks: each keeps its own beside the checkpoint.
    if let Some(state) = collective.powersgd_state() {
        checkpoint::save_rank_state(&args.checkpoint_dir, rank.rank, step, &state)?;
    }
    if !rank.is_main() {
        return Ok(());
    }
    let latest = Latest {
        file: format!("step-{step}.safetensors"),
        step,
        world_size: collective.world_size,
        data_sha256: data.sha256.clone(),
        seed: args.seed,
        run_id: run_id(),
        train_loss: train_loss.is_finite().then_some(train_loss),
    };
    let mut tensors: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| (format!("model.{n}"), t.shallow_clone()))
        .collect();
    tensors.extend(optimizer.state());
    checkpoint::save(&args.checkpoint_dir, &latest, &tensors)?;
    event(TrainEvent::Checkpoint(events::Checkpoint {
        step,
        dir: args.checkpoint_dir.display().to_string(),
    }));
    Ok(())
}

/// Writes the model as a Hugging Face directory transformers loads with
/// `BertForSequenceClassification.from_pretrained`.
fn export(
    out: &Path,
    model: &BertClassifier,
    params: &[(String, Tensor)],
    encoder: &TextEncoder,
    labels: &[String],
) -> anyhow::Result<()> {
    let mut config = serde_json::to_value(&model.config)?;
    let id2label: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), json!(l)))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), json!(i)))
        .collect();
    if let Some(object) = config.as_object_mut() {
        object.insert(
            "architectures".into(),
            json!(["BertForSequenceClassification"]),
        );
        object.insert("model_type".into(), json!("bert"));
        object.insert("id2label".into(), json!(id2label));
        object.insert("label2id".into(), json!(label2id));
        object.insert("torch_dtype".into(), json!("float32"));
    }
    let config = serde_json::to_vec_pretty(&config)?;
    checkpoint::write_directory(out, |dir| {
        checkpoint::write_file(&dir.join("config.json"), &config)?;
        // Saved as float32 whatever the training precision, as config.json says.
        let float: Vec<(String, Tensor)> = params
            .iter()
            .map(|(n, t)| (n.clone(), t.to_kind(Kind::Float)))
            .collect();
        checkpoint::write_tensors(&dir.join("model.safetensors"), &float)?;
        encoder
            .save(&dir.join("tokenizer.json"))
            .map_err(|e| checkpoint::CheckpointError::File {
                path: dir.join("tokenizer.json"),
                message: e.to_string(),
            })
    })?;
    Ok(())
}

/// SHA-256 over every parameter (name, then its float32 bytes, little-endian), in name order.
pub fn parameters_sha256(params: &[(String, Tensor)]) -> anyhow::Result<String> {
    let mut hash = Sha256::new();
    for (name, tensor) in params {
        hash.update(name.as_bytes());
        let values = Vec::<f32>::try_from(
            tensor
                .detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .flatten(0, -1),
        )?;
        for value in values {
            hash.update(value.to_le_bytes());
        }
    }
    Ok(hex::encode(hash.finalize()))
}

#[derive(Debug, Default, Clone, Copy)]
struct Evaluation {
    loss: f64,
    accuracy: f64,
}

fn evaluate(
    model: &BertClassifier,
    batches: &Batches,
    validation: &[usize],
    rank: &Rank,
    collective: &Collective,
    batch_size: usize,
) -> anyhow::Result<Evaluation> {
    let rows = data::shard_unpadded(validation, rank.rank, rank.world_size);
    let mut sums = [0.0f64; 3];
    tch::no_grad(|| {
        for chunk in rows.chunks(batch_size) {
            let (input, mask, targets) = batches.make(chunk);
            let logits = model.forward(&input, &mask, false).to_kind(Kind::Float);
            let loss =
                logits.cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Sum, -100, 0.0);
            let correct = logits
                .argmax(-1, false)
                .eq_tensor(&targets)
                .sum(Kind::Int64);
            sums[0] += loss.double_value(&[]);
            sums[1] += correct.double_value(&[]);
            sums[2] += chunk.len() as f64;
        }
    });
    let total = collective
        .sum(&sums)
        .map_err(|e| collective.failure(rank, "summing the validation", e))?;
    if total[2] == 0.0 {
        return Ok(Evaluation {
            loss: f64::NAN,
            accuracy: f64::NAN,
        });
    }
    Ok(Evaluation {
        loss: total[0] / total[2],
        accuracy: total[1] / total[2],
    })
}

struct Batches<'a> {
    ids: &'a [Vec<i64>],
    targets: &'a [i64],
    pad: i64,
    device: Device,
}

impl Batches<'_> {
    /// Input ids and attention mask padded to the batch's longest row, and the targets.
    fn make(&self, rows: &[usize]) -> (Tensor, Tensor, Tensor) {
        let len = rows
            .iter()
            .map(|&r| self.ids[r].len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut input = Vec::with_capacity(rows.len() * len);
        let mut mask = Vec::with_capacity(rows.len() * len);
        for &row in rows {
            let ids = &self.ids[row];
            input.extend_from_slice(ids);
            input.extend(std::iter::repeat_n(self.pad, len - ids.len()));
            mask.extend(std::iter::repeat_n(1i64, ids.len()));
            mask.extend(std::iter::repeat_n(0i64, len - ids.len()));
        }
        let shape = [rows.len() as i64, len as i64];
        let targets: Vec<i64> = rows.iter().map(|&r| self.targets[r]).collect();
        (
            Tensor::from_slice(&input)
                .view(shape)
                .to_device(self.device),
            Tensor::from_slice(&mask).view(shape).to_device(self.device),
            Tensor::from_slice(&targets).to_device(self.device),
        )
    }
}

#[derive(Debug, Default)]
struct Timing {
    total: f64,
    count: u64,
}

impl Timing {
    fn add(&mut self, seconds: f64) {
        self.total += seconds;
        self.count += 1;
    }

    fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.total / self.count as f64
        }
    }
}

/// Logits of a trained model directory for each text, as JSON lines (with the token ids, so the
/// same input can be fed to another implementation).
pub fn predict(dir: &Path, texts: &[String], max_len: usize) -> anyhow::Result<()> {
    let config = BertConfig::load(&dir.join("config.json"))?;
    let labels = labels_of(&dir.join("config.json"))?;
    let encoder = TextEncoder::load(dir, max_len)?;
    let vars = nn::VarStore::new(Device::Cpu);
    let model = BertClassifier::new(&vars.root(), config, labels.len() as i64);
    let report = model::load_weights(&vars, &dir.join("model.safetensors"))?;
    if let Some(missing) = report.fresh.first() {
        bail!(
            "{} has no {missing}: it is not a trained classifier",
            dir.display()
        );
    }
    let ids = encoder.encode_all(texts)?;
    tch::no_grad(|| -> anyhow::Result<()> {
        for (text, ids) in texts.iter().zip(&ids) {
            let input = Tensor::from_slice(ids).view([1, ids.len() as i64]);
            let mask = input.ones_like();
            let logits = Vec::<f32>::try_from(model.forward(&input, &mask, false).flatten(0, -1))?;
            let best = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap_or(0);
            // One line per text (not a training event).
            println!(
                "{}",
                json!({"text": text, "input_ids": ids, "logits": logits, "label": labels.get(best)})
            );
        }
        Ok(())
    })
}

/// Label names in index order from config.json's id2label (num_labels when absent).
fn labels_of(config: &Path) -> anyhow::Result<Vec<String>> {
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(config)?)?;
    if let Some(map) = value.get("id2label").and_then(|v| v.as_object()) {
        let mut labels = vec![String::new(); map.len()];
        for (id, label) in map {
            let index: usize = id
                .parse()
                .with_context(|| format!("{}: id2label key {id:?}", config.display()))?;
            let slot = labels
                .get_mut(index)
                .with_context(|| format!("{}: id2label has a gap", config.display()))?;
            *slot = label.as_str().unwrap_or_default().to_string();
        }
        return Ok(labels);
    }
    let count = value
        .get("num_labels")
        .and_then(|v| v.as_u64())
        .unwrap_or(2);
    Ok((0..count).map(|i| format!("LABEL_{i}")).collect())
}

/// Dynamic loss scaling for float16, as torch.amp.GradScaler does: the loss is multiplied by
/// `scale` so small gradients survive float16; a step whose gradients overflowed is skipped and
/// the scale halved; after 2,000 good steps it doubles. With other precisions the scale stays 1.
struct LossScale {
    enabled: bool,
    scale: f64,
    good_steps: u32,
}

impl LossScale {
    fn new(enabled: bool) -> LossScale {
        LossScale {
            enabled,
            scale: if enabled { 65536.0 } else { 1.0 },
            good_steps: 0,
        }
    }

    /// Divides the gradients by the scale; false when they overflowed and the step must be
    /// skipped.
    fn unscale(&mut self, grads: &[Tensor]) -> bool {
        if !self.enabled {
            return true;
        }
        let finite = tch::no_grad(|| {
            let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
            Tensor::stack(&norms, 0).isfinite().all().int64_value(&[]) == 1
        });
        if !finite {
            self.scale /= 2.0;
            self.good_steps = 0;
            return false;
        }
        tch::no_grad(|| {
            for grad in grads {
                let _ = grad.shallow_clone().g_mul_scalar_(1.0 / self.scale);
            }
        });
        self.good_steps += 1;
        if self.good_steps == 2000 {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}
