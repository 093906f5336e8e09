//! fleet-train (feature `train`): fine-tunes a BERT-family text classifier on every rank of a
//! job, with tch (libtorch) for the model and PyTorch's c10d for the gradients.
//!
//! - [`cli`]: fleet-train's command line.
//! - [`data`]: the CSV table, the seeded split and the per-rank shards (DistributedSampler's).
//! - [`tokenizer`]: a model's tokenizer, or a WordPiece vocabulary built from the text.
//! - [`model`]: BERT with a classification head, Hugging Face parameter names.
//! - [`optim`]: AdamW, the warm-up/decay schedule, gradient clipping.
//! - [`ddp`]: the c10d shim (store, Gloo, NCCL); the trainer's only `unsafe`.
//! - [`powersgd`]: low-rank gradient compression with error feedback (PowerSGD).
//! - [`rank`]: the torchrun environment and the collectives the loop uses.
//! - [`trainer`]: the loop, validation, checkpoints, export and the summary line.
//! - [`checkpoint`]: atomic checkpoints and the exported model directory.
//! - [`gendata`]: the synthetic dataset of the demo and the tests.

pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod ddp;
pub mod gendata;
pub mod model;
pub mod optim;
pub mod powersgd;
pub mod rank;
pub mod tokenizer;
pub mod trainer;
