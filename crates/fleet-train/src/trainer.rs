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
use super::ddp::{self, Backend, CommError};
use super::model::{self, BertClassifier, BertConfig, Preset};
use super::optim::{self, AdamW};
use super::powersgd::PowerSgd;
use super::rank::{Collective, Rank};
use super::tokenizer::TextEncoder;
use fleet_events::{self as events, Progress, Summary, TrainEvent, Validation, WorldChanged};

/// Trains on this rank; returns its summary, the line every rank prints last: the data and
/// the model set up identically on every rank, the checkpoint restored, then the epochs, the
/// last checkpoint and the exported model.
pub fn run(args: &TrainArgs, rank: &Rank) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let data_path = args.data.clone().context("--data is required")?;
    check_args(args)?;
    let device = device(args.device, rank)?;
    let backend = match (args.backend, device) {
        (BackendChoice::Gloo, _) => Backend::Gloo,
        (BackendChoice::Nccl, _) => Backend::Nccl,
        (BackendChoice::Auto, Device::Cuda(_)) => Backend::Nccl,
        (BackendChoice::Auto, _) => Backend::Gloo,
    };
    let (data, split) = load_data(args, &data_path, rank)?;
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
    let (encoder, config) = encoder_and_config(args, &train_texts)?;
    let (vars, model) = build_model(args, rank, device, config, data.labels.len())?;
    let params = model::named_parameters(&vars);
    let mut optimizer = AdamW::new(&params, args.weight_decay);
    let resume = Resume::from(args);
    let restored = restore(
        args,
        rank,
        &collective,
        &params,
        &mut optimizer,
        resume,
        &data,
    )?;
    let grad_accum = accumulation_for(args.grad_accum, restored.world_size, rank);
    share_and_reduce(args, rank, &mut collective, &params, resume, &restored)?;

    let ids = encoder.encode_all(&data.texts)?;
    let mut trainer = Trainer {
        args,
        rank,
        device,
        collective,
        model,
        params,
        optimizer,
        scaler: LossScale::new(args.precision == Precision::Fp16),
        batches: Batches {
            ids: &ids,
            targets: &data.targets,
            pad: encoder.pad_id(),
            device,
        },
        split: &split,
        data: &data,
        schedule: Schedule::new(args, split.train.len(), rank.world_size, grad_accum),
        step: restored.step,
        timing: Timing::default(),
        window: LossWindow::default(),
        last: Evaluation::default(),
        train_loss: f64::NAN,
    };
    trainer.train()?;
    if restored.step >= trainer.schedule.total {
        // Nothing was left to train: report what the checkpoint holds, measured again, not
        // the zeros of a loop that never ran.
        trainer.train_loss = restored.train_loss.unwrap_or(f64::NAN);
        trainer.validate(args.epochs, true)?;
    }
    trainer.save_checkpoint()?;
    if rank.is_main() {
        export(
            &args.output,
            &trainer.model,
            &trainer.params,
            &encoder,
            &data.labels,
        )?;
    }
    trainer.summary(backend, started)
}

/// The classifier, seeded alike on every rank, with a pretrained model's weights (`--model`),
/// in float64 with --precision fp64. The variables are returned with it: they own its tensors.
fn build_model(
    args: &TrainArgs,
    rank: &Rank,
    device: Device,
    config: BertConfig,
    labels: usize,
) -> anyhow::Result<(nn::VarStore, BertClassifier)> {
    tch::manual_seed(args.seed as i64);
    let mut vars = nn::VarStore::new(device);
    let model = BertClassifier::new(&vars.root(), config, labels as i64);
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
    Ok((vars, model))
}

/// The dataset and its seeded split into training and validation rows, enough training rows
/// for every rank.
fn load_data(args: &TrainArgs, path: &Path, rank: &Rank) -> anyhow::Result<(Dataset, Split)> {
    let data = Dataset::load(path, &args.text_column, &args.label_column)?;
    let split = Split::new(data.len(), args.val_fraction, args.seed);
    if split.train.len() < rank.world_size {
        bail!(
            "{} training rows cannot be shared by {} ranks",
            split.train.len(),
            rank.world_size
        );
    }
    Ok((data, split))
}

/// The numbers that must be in range before anything starts.
fn check_args(args: &TrainArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 || args.grad_accum == 0 || args.epochs == 0 {
        bail!("--batch-size, --grad-accum and --epochs must be at least 1");
    }
    if !(0.0..1.0).contains(&args.val_fraction) {
        bail!("--val-fraction must be at least 0 and below 1");
    }
    Ok(())
}

/// The kind gradients travel as between the ranks (`None`: as they are).
fn wire_kind(dtype: WireDtype) -> Option<Kind> {
    match dtype {
        WireDtype::Fp32 => None,
        WireDtype::Bf16 => Some(Kind::BFloat16),
        WireDtype::Fp16 => Some(Kind::Half),
    }
}

/// The tokenizer and model shape: a pretrained model's (`--model`), or a tokenizer built from
/// the training texts and a preset's shape; `--dropout` applies to either.
fn encoder_and_config(
    args: &TrainArgs,
    train_texts: &[String],
) -> anyhow::Result<(TextEncoder, BertConfig)> {
    let (encoder, mut config) = match &args.model {
        Some(dir) => {
            let config = BertConfig::load(&dir.join("config.json"))?;
            (TextEncoder::load(dir, args.max_len)?, config)
        }
        None => {
            let encoder = TextEncoder::build(train_texts, args.vocab_size, args.max_len)?;
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
    Ok((encoder, config))
}

/// Hands rank 0's parameters to every rank and prepares the gradient all-reduce (buckets,
/// overlap, the wire's kind, PowerSGD and its state from the checkpoint).
fn share_and_reduce(
    args: &TrainArgs,
    rank: &Rank,
    collective: &mut Collective,
    params: &[(String, Tensor)],
    resume: Resume,
    restored: &Restored,
) -> anyhow::Result<()> {
    let trained: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    collective.broadcast(&trained)?;
    let wire = wire_kind(args.allreduce_dtype);
    let powersgd = (args.powersgd_rank > 0).then(|| {
        let mut compressor = PowerSgd::new(
            &trained,
            args.powersgd_rank,
            args.powersgd_warmup_steps,
            wire,
        );
        compressor.steps = restored.step;
        compressor
    });
    collective
        .reduce_gradients_of(&trained, wire, !args.no_overlap, powersgd)
        .map_err(|e| anyhow::anyhow!("preparing the gradient all-reduce: {e}"))?;
    if args.powersgd_rank > 0 && restored.step > 0 {
        resume_powersgd(args, rank, collective, resume, restored)?;
    }
    Ok(())
}

/// Steps, learning rate and batch sizes of the run, the same on every rank.
struct Schedule {
    /// Micro-batches per step.
    grad_accum: usize,
    steps_per_epoch: u64,
    /// Steps the epochs make, which the learning rate's decay spans.
    scheduled: u64,
    /// Steps this run trains to (--max-steps may end it sooner).
    total: u64,
    warmup: u64,
    peak_lr: f64,
    samples_per_step: f64,
    /// Steps between checkpoints (0: only the last).
    checkpoint_every: u64,
}

impl Schedule {
    fn new(args: &TrainArgs, train_rows: usize, world_size: usize, grad_accum: usize) -> Schedule {
        let shard_len = train_rows.div_ceil(world_size);
        let micro_per_epoch = shard_len.div_ceil(args.batch_size);
        let steps_per_epoch = micro_per_epoch.div_ceil(grad_accum) as u64;
        let scheduled = steps_per_epoch * args.epochs;
        let default_lr = if args.model.is_some() { 5e-5 } else { 1e-3 };
        let default_every = if max_restarts() > 0 {
            RESTARTABLE_EVERY
        } else {
            0
        };
        Schedule {
            grad_accum,
            steps_per_epoch,
            scheduled,
            total: scheduled.min(args.max_steps.unwrap_or(u64::MAX)),
            warmup: (scheduled as f64 * args.warmup).round() as u64,
            peak_lr: args.lr.unwrap_or(default_lr),
            samples_per_step: (args.batch_size * grad_accum * world_size) as f64,
            checkpoint_every: args.checkpoint_every.unwrap_or(default_every),
        }
    }

    /// The learning rate of step `step` (counted from 0).
    fn lr(&self, step: u64) -> f64 {
        optim::linear_schedule(step, self.warmup, self.scheduled, self.peak_lr)
    }
}

/// The summed loss and time of some steps: those since the last progress report, or an
/// epoch's.
#[derive(Debug, Default)]
struct LossWindow {
    loss: f64,
    steps: u64,
    seconds: f64,
}

impl LossWindow {
    fn add(&mut self, loss: f64, seconds: f64) {
        self.loss += loss;
        self.steps += 1;
        self.seconds += seconds;
    }

    /// The mean loss over every rank's steps in their windows, not this rank's alone.
    fn mean_over_ranks(&self, collective: &Collective) -> Result<f64, CommError> {
        let sums = collective.sum(&[self.loss, self.steps as f64])?;
        Ok(sums[0] / sums[1].max(1.0))
    }
}

/// One rank's training once everything is set up: the model, its optimizer, the collective
/// the gradients go through, and where the run stands.
struct Trainer<'a> {
    args: &'a TrainArgs,
    rank: &'a Rank,
    device: Device,
    collective: Collective,
    model: BertClassifier,
    params: Vec<(String, Tensor)>,
    optimizer: AdamW,
    scaler: LossScale,
    batches: Batches<'a>,
    split: &'a Split,
    data: &'a Dataset,
    schedule: Schedule,
    /// Steps taken, counting those of the checkpoint resumed.
    step: u64,
    timing: Timing,
    /// The steps since the last progress report.
    window: LossWindow,
    /// The last validation.
    last: Evaluation,
    /// The last epoch's training loss over every rank.
    train_loss: f64,
}

impl Trainer<'_> {
    /// The epochs left, from where the checkpoint resumed to --epochs or --max-steps.
    fn train(&mut self) -> anyhow::Result<()> {
        let first_epoch = self.step / self.schedule.steps_per_epoch;
        for epoch in first_epoch..self.args.epochs {
            if self.step >= self.schedule.total {
                break;
            }
            self.epoch(epoch)?;
        }
        Ok(())
    }

    /// One epoch (or what is left of it) over this rank's shard, its progress reports and
    /// checkpoints, then the epoch's loss and a validation.
    fn epoch(&mut self, epoch: u64) -> anyhow::Result<()> {
        let (args, rank) = (self.args, self.rank);
        let shard = data::shard(
            &self.split.train,
            epoch,
            args.seed,
            rank.rank,
            rank.world_size,
        );
        let micro: Vec<&[usize]> = shard.chunks(args.batch_size).collect();
        let grad_accum = self.schedule.grad_accum;
        let mut epoch_loss = LossWindow::default();
        let first = (self.step - epoch * self.schedule.steps_per_epoch) as usize;
        for in_epoch in first..self.schedule.steps_per_epoch as usize {
            if self.step >= self.schedule.total {
                break;
            }
            let started = Instant::now();
            let group =
                &micro[in_epoch * grad_accum..((in_epoch + 1) * grad_accum).min(micro.len())];
            let loss = self.train_step(group)?;
            let seconds = started.elapsed().as_secs_f64();
            self.timing.add(seconds);
            self.window.add(loss, seconds);
            epoch_loss.add(loss, seconds);
            if self.step % args.log_every.max(1) == 0 || self.step == self.schedule.total {
                self.report_progress(epoch)?;
            }
            let every = self.schedule.checkpoint_every;
            if every > 0 && self.step % every == 0 && self.step < self.schedule.total {
                self.save_checkpoint()?;
            }
        }
        self.train_loss = epoch_loss
            .mean_over_ranks(&self.collective)
            .map_err(|e| self.collective.failure(rank, "summing the epoch's loss", e))?;
        self.validate(epoch + 1, false)
    }

    /// One optimizer step over `group`'s micro-batches: their gradients accumulated, averaged
    /// over the ranks, clipped and applied (unless fp16's scale overflowed). Returns the mean
    /// loss of the group.
    fn train_step(&mut self, group: &[&[usize]]) -> anyhow::Result<f64> {
        let (args, rank) = (self.args, self.rank);
        // Dropout masks depend only on the seed, the step and the rank: a resumed run draws
        // the same ones.
        tch::manual_seed(
            (args.seed.wrapping_mul(1_000_003)
                + self.step * rank.world_size as u64
                + rank.rank as u64) as i64,
        );
        let mut loss_sum = 0.0;
        for (i, rows) in group.iter().enumerate() {
            let (input, mask, targets) = self.batches.make(rows);
            let logits = self.forward(&input, &mask)?;
            let loss = logits.cross_entropy_for_logits(&targets);
            if i + 1 == group.len() {
                self.collective
                    .before_last_backward()
                    .map_err(|e| anyhow::anyhow!("preparing the gradient all-reduce: {e}"))?;
            }
            (&loss * (self.scaler.scale / group.len() as f64)).backward();
            loss_sum += loss.double_value(&[]);
        }
        if let Err(error) = self.collective.average_gradients() {
            let what = format!("gradient all-reduce at step {}", self.step + 1);
            return Err(self.collective.failure(rank, &what, error));
        }
        // Every rank holds the same averaged gradients, so every rank takes the same decision.
        let grads = self.optimizer.grads();
        if self.scaler.unscale(&grads) {
            optim::clip_grad_norm(&grads, args.max_grad_norm);
            self.optimizer
                .step(self.schedule.lr(self.step))
                .map_err(|e| anyhow::anyhow!("optimizer step {}: {e}", self.step + 1))?;
        }
        self.optimizer.zero_grad();
        self.step += 1;
        if let Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
        Ok(loss_sum / group.len() as f64)
    }

    /// The training forward pass, under autocast with --precision bf16 or fp16.
    fn forward(&self, input: &Tensor, mask: &Tensor) -> anyhow::Result<Tensor> {
        let precision = self.args.precision;
        if !matches!(precision, Precision::Bf16 | Precision::Fp16) {
            return Ok(self.model.forward(input, mask, true));
        }
        let fp16 = precision == Precision::Fp16;
        let logits = ddp::autocast(self.device, fp16, || self.model.forward(input, mask, true))?;
        Ok(logits.to_kind(Kind::Float))
    }

    /// A progress event (rank 0) on the steps since the last one.
    fn report_progress(&mut self, epoch: u64) -> anyhow::Result<()> {
        let window = std::mem::take(&mut self.window);
        let loss = window
            .mean_over_ranks(&self.collective)
            .map_err(|e| self.collective.failure(self.rank, "summing the loss", e))?;
        if self.rank.is_main() {
            let (schedule, mean) = (&self.schedule, self.timing.mean());
            event(TrainEvent::Progress(Progress {
                epoch: epoch + 1,
                epochs: self.args.epochs,
                step: self.step,
                steps: schedule.total,
                loss,
                lr: schedule.lr(self.step),
                samples_per_s: schedule.samples_per_step / mean.max(1e-9),
                step_ms: window.seconds * 1000.0 / window.steps.max(1) as f64,
                eta_s: (schedule.total - self.step) as f64 * mean,
            }));
        }
        Ok(())
    }

    /// Measures the validation rows and says so (rank 0), as after epoch `epoch`.
    fn validate(&mut self, epoch: u64, nothing_left: bool) -> anyhow::Result<()> {
        self.last = self.evaluate()?;
        if self.rank.is_main() {
            event(TrainEvent::Validation(Validation {
                epoch,
                step: self.step,
                train_loss: self.train_loss,
                val_loss: self.last.loss,
                val_accuracy: self.last.accuracy,
                nothing_left,
            }));
        }
        Ok(())
    }

    /// The loss and accuracy over every rank's share of the validation rows.
    fn evaluate(&self) -> anyhow::Result<Evaluation> {
        let rank = self.rank;
        let rows = data::shard_unpadded(&self.split.validation, rank.rank, rank.world_size);
        let mut sums = [0.0f64; 3];
        tch::no_grad(|| {
            for chunk in rows.chunks(self.args.batch_size) {
                let (input, mask, targets) = self.batches.make(chunk);
                let logits = self
                    .model
                    .forward(&input, &mask, false)
                    .to_kind(Kind::Float);
                let loss = logits.cross_entropy_loss::<Tensor>(
                    &targets,
                    None,
                    tch::Reduction::Sum,
                    -100,
                    0.0,
                );
                let correct = logits
                    .argmax(-1, false)
                    .eq_tensor(&targets)
                    .sum(Kind::Int64);
                sums[0] += loss.double_value(&[]);
                sums[1] += correct.double_value(&[]);
                sums[2] += chunk.len() as f64;
            }
        });
        let total = self
            .collective
            .sum(&sums)
            .map_err(|e| self.collective.failure(rank, "summing the validation", e))?;
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

    /// A checkpoint at this step: the model and optimizer by rank 0, PowerSGD's error feedback
    /// by every rank beside it (it differs between ranks).
    fn save_checkpoint(&self) -> anyhow::Result<()> {
        let (args, rank, step) = (self.args, self.rank, self.step);
        if let Some(state) = self.collective.powersgd_state() {
            checkpoint::save_rank_state(&args.checkpoint_dir, rank.rank, step, &state)?;
        }
        if !rank.is_main() {
            return Ok(());
        }
        let latest = Latest {
            file: format!("step-{step}.safetensors"),
            step,
            world_size: self.collective.world_size,
            data_sha256: self.data.sha256.clone(),
            seed: args.seed,
            run_id: run_id(),
            train_loss: self.train_loss.is_finite().then_some(self.train_loss),
        };
        let mut tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, t)| (format!("model.{n}"), t.shallow_clone()))
            .collect();
        tensors.extend(self.optimizer.state());
        checkpoint::save(&args.checkpoint_dir, &latest, &tensors)?;
        event(TrainEvent::Checkpoint(events::Checkpoint {
            step,
            dir: args.checkpoint_dir.display().to_string(),
        }));
        Ok(())
    }

    /// This rank's summary line.
    fn summary(&self, backend: Backend, started: Instant) -> anyhow::Result<Summary> {
        let (args, rank, collective) = (self.args, self.rank, &self.collective);
        let (timing, steps) = (&self.timing, self.timing.count.max(1));
        let trained = timing.count > 0;
        Ok(Summary {
            rank: rank.rank as u64,
            world_size: rank.world_size as u64,
            host: rank.host.clone(),
            backend: backend.name().into(),
            device: format!("{:?}", self.device).to_lowercase(),
            steps: self.step,
            epochs: args.epochs,
            params: self.params.iter().map(|(_, t)| t.numel() as u64).sum(),
            train_loss: self.train_loss,
            val_loss: self.last.loss,
            val_accuracy: self.last.accuracy,
            steps_trained: timing.count,
            samples_per_s: trained
                .then(|| self.schedule.samples_per_step / timing.mean().max(1e-9)),
            step_ms: trained.then(|| timing.mean() * 1000.0),
            comm_fraction: collective.comm_seconds / timing.total.max(1e-9),
            comm_ms: collective.comm_seconds * 1000.0 / steps as f64,
            wait_ms: collective.wait_seconds * 1000.0 / steps as f64,
            overlap: !args.no_overlap,
            overlapped: collective.buckets_overlapped as f64
                / collective.buckets_reduced.max(1) as f64,
            buckets: collective.buckets() as u64,
            compression: match (collective.powersgd_rank(), args.allreduce_dtype) {
                (Some(_), _) => "powersgd",
                (None, WireDtype::Fp32) => "none",
                (None, WireDtype::Bf16) => "bf16",
                (None, WireDtype::Fp16) => "fp16",
            }
            .into(),
            powersgd_rank: collective.powersgd_rank().unwrap_or(0) as u64,
            comm_bytes_per_step: collective.comm_bytes / steps,
            params_sha256: parameters_sha256(&self.params)?,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
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

/// What a checkpoint handed to every rank (all zero: none).
#[derive(Debug, Default)]
struct Restored {
    /// The step to continue from (0: a fresh start).
    step: u64,
    /// The world size the checkpoint was made with (0: none).
    world_size: usize,
    /// The training loss it recorded.
    train_loss: Option<f64>,
}

/// Loads the last checkpoint on rank 0 and hands its step, weights and optimizer state to every
/// rank.
fn restore(
    args: &TrainArgs,
    rank: &Rank,
    collective: &Collective,
    params: &[(String, Tensor)],
    optimizer: &mut AdamW,
    resume: Resume,
    data: &Dataset,
) -> anyhow::Result<Restored> {
    let mut loaded = Restored::default();
    if resume != Resume::No && rank.is_main() {
        loaded = load_checkpoint(resume.dir(args), resume, params, optimizer, data)?;
    }
    let device = params[0].1.device();
    let shared =
        Tensor::from_slice(&[loaded.step as i64, loaded.world_size as i64]).to_device(device);
    let loss = Tensor::from_slice(&[loaded.train_loss.unwrap_or(f64::NAN)]).to_device(device);
    collective.broadcast(std::slice::from_ref(&shared))?;
    collective.broadcast(std::slice::from_ref(&loss))?;
    let step = shared.int64_value(&[0]);
    if step > 0 {
        let state: Vec<Tensor> = optimizer.state().into_iter().map(|(_, t)| t).collect();
        collective.broadcast(&state)?;
        optimizer.set_steps(step);
    }
    Ok(Restored {
        step: step as u64,
        world_size: shared.int64_value(&[1]) as usize,
        train_loss: Some(loss.double_value(&[0])).filter(|l| l.is_finite()),
    })
}

/// Rank 0's part of [`restore`]: the checkpoint in `dir` copied into the parameters and the
/// optimizer's state, and a resume event either way.
fn load_checkpoint(
    dir: &Path,
    resume: Resume,
    params: &[(String, Tensor)],
    optimizer: &mut AdamW,
    data: &Dataset,
) -> anyhow::Result<Restored> {
    let said = |found: bool, step: u64, other_job: Option<String>| {
        event(TrainEvent::Resume(events::Resume {
            found,
            step,
            dir: dir.display().to_string(),
            other_job,
        }))
    };
    let Some((latest, tensors)) = checkpoint::load(dir)? else {
        said(false, 0, None);
        return Ok(Restored::default());
    };
    // A restart continues its own job only: a checkpoint another job left in a shared folder
    // would hand it that job's model.
    if resume == Resume::Restart && latest.run_id != run_id() {
        said(false, latest.step, latest.run_id.clone());
        return Ok(Restored::default());
    }
    if latest.data_sha256 != data.sha256 {
        bail!(
            "the checkpoint in {} was made with other data (sha256 {})",
            dir.display(),
            latest.data_sha256
        );
    }
    let saved: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    let mut targets: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| (format!("model.{n}"), t.shallow_clone()))
        .collect();
    targets.extend(optimizer.state());
    tch::no_grad(|| -> anyhow::Result<()> {
        for (name, target) in &targets {
            let source = saved
                .get(name)
                .with_context(|| format!("the checkpoint in {} has no {name}", dir.display()))?;
            if source.size() != target.size() {
                bail!("the checkpoint's {name} has another shape: was the model changed?");
            }
            target.shallow_clone().copy_(source);
        }
        Ok(())
    })?;
    said(true, latest.step, None);
    Ok(Restored {
        step: latest.step,
        world_size: latest.world_size,
        train_loss: latest.train_loss,
    })
}

/// Continues PowerSGD's error feedback and warm-started Q from the checkpoint at `step`, when
/// every rank finds its own state there (the same world); otherwise it starts afresh, said once.
fn resume_powersgd(
    args: &TrainArgs,
    rank: &Rank,
    collective: &mut Collective,
    resume: Resume,
    restored: &Restored,
) -> anyhow::Result<()> {
    let (step, saved_world) = (restored.step, restored.world_size);
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
