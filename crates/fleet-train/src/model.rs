//! A BERT encoder with a classification head, as `transformers.BertForSequenceClassification`
//! computes it, with the same parameter names, so that Hugging Face weights load into it and
//! the weights it writes load into transformers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// The fields of a Hugging Face BERT `config.json` that the model uses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    pub max_position_embeddings: i64,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: i64,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> i64 {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// Sizes for training from scratch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 2 layers, hidden 128 (about 1.4 M parameters with an 8,000-word vocabulary).
    Tiny,
    /// 4 layers, hidden 256.
    Small,
    /// BERT-base: 12 layers, hidden 768 (110 M parameters with a 30,522-word vocabulary).
    Base,
}

impl BertConfig {
    pub fn preset(preset: Preset, vocab_size: i64, max_positions: i64) -> BertConfig {
        let (hidden, layers, heads) = match preset {
            Preset::Tiny => (128, 2, 2),
            Preset::Small => (256, 4, 4),
            Preset::Base => (768, 12, 12),
        };
        BertConfig {
            vocab_size,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: hidden * 4,
            hidden_act: default_act(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            classifier_dropout: None,
            max_position_embeddings: max_positions,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
        }
    }

    pub fn load(path: &Path) -> Result<BertConfig, ModelError> {
        let file_error = |message: String| ModelError::File {
            path: path.into(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
        let config: BertConfig =
            serde_json::from_slice(&bytes).map_err(|e| file_error(e.to_string()))?;
        if !matches!(
            config.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu"
        ) {
            return Err(file_error(format!(
                "hidden_act {:?} is not supported",
                config.hidden_act
            )));
        }
        if config.num_attention_heads <= 0 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(file_error(
                "hidden_size is not a multiple of num_attention_heads".into(),
            ));
        }
        Ok(config)
    }
}

struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(path: nn::Path, inputs: i64, outputs: i64) -> Linear {
        let weight = path.var(
            "weight",
            &[outputs, inputs],
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let bias = path.var("bias", &[outputs], Init::Const(0.0));
        Linear { weight, bias }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(path: nn::Path, size: i64, eps: f64) -> LayerNorm {
        let weight = path.var("weight", &[size], Init::Const(1.0));
        let bias = path.var("bias", &[size], Init::Const(0.0));
        LayerNorm { weight, bias, eps }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.weight.size()[0]],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct BertClassifier {
    pub config: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    pooler: Linear,
    classifier: Linear,
}

impl BertClassifier {
    /// Creates the parameters in `root` with BERT's initialisation (normal(0, 0.02), zero biases).
    pub fn new(root: &nn::Path, config: BertConfig, num_labels: i64) -> BertClassifier {
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let bert = root / "bert";
        let embeddings = &bert / "embeddings";
        let normal = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let word_embeddings =
            (&embeddings / "word_embeddings").var("weight", &[config.vocab_size, h], normal);
        let position_embeddings = (&embeddings / "position_embeddings").var(
            "weight",
            &[config.max_position_embeddings, h],
            normal,
        );
        let token_type_embeddings = (&embeddings / "token_type_embeddings").var(
            "weight",
            &[config.type_vocab_size, h],
            normal,
        );
        let embedding_norm = LayerNorm::new(&embeddings / "LayerNorm", h, eps);
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let layer = &bert / "encoder" / "layer" / i;
                let attention = &layer / "attention";
                Layer {
                    query: Linear::new(&attention / "self" / "query", h, h),
                    key: Linear::new(&attention / "self" / "key", h, h),
                    value: Linear::new(&attention / "self" / "value", h, h),
                    attention_output: Linear::new(&attention / "output" / "dense", h, h),
                    attention_norm: LayerNorm::new(&attention / "output" / "LayerNorm", h, eps),
                    intermediate: Linear::new(
                        &layer / "intermediate" / "dense",
                        h,
                        config.intermediate_size,
                    ),
                    output: Linear::new(&layer / "output" / "dense", config.intermediate_size, h),
                    output_norm: LayerNorm::new(&layer / "output" / "LayerNorm", h, eps),
                }
            })
            .collect();
        let pooler = Linear::new(&bert / "pooler" / "dense", h, h);
        let classifier = Linear::new(root / "classifier", h, num_labels);
        BertClassifier {
            config,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embedding_norm,
            layers,
            pooler,
            classifier,
        }
    }

    /// Logits `[batch, num_labels]` for `input_ids` and `attention_mask` (both `[batch, len]`,
    /// int64). Dropout only when `train`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Tensor {
        let config = &self.config;
        let (batch, len) = input_ids.size2().unwrap_or((0, 0));
        let device = input_ids.device();
        let hidden_dropout = if train {
            config.hidden_dropout_prob
        } else {
            0.0
        };
        let attention_dropout = if train {
            config.attention_probs_dropout_prob
        } else {
            0.0
        };

        let positions = Tensor::arange(len, (Kind::Int64, device));
        let embed =
            |weight: &Tensor, ids: &Tensor| Tensor::embedding(weight, ids, -1, false, false);
        let mut x = embed(&self.word_embeddings, input_ids)
            + embed(&self.position_embeddings, &positions).unsqueeze(0)
            + self.token_type_embeddings.get(0);
        x = self
            .embedding_norm
            .forward(&x)
            .dropout(hidden_dropout, train);

        // Masked keys get the dtype's lowest value before the softmax, as transformers does.
        let kind = x.kind();
        let keep = attention_mask.to_kind(kind).view([batch, 1, 1, len]);
        let mask = (keep.ones_like() - keep) * lowest(kind);
        let heads = config.num_attention_heads;
        let head_size = config.hidden_size / heads;
        let split = |t: Tensor| t.view([batch, len, heads, head_size]).transpose(1, 2);
        for layer in &self.layers {
            let q = split(layer.query.forward(&x));
            let k = split(layer.key.forward(&x));
            let v = split(layer.value.forward(&x));
            let context = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(&mask),
                attention_dropout,
                false,
                None,
                false,
            )
            .transpose(1, 2)
            .reshape([batch, len, config.hidden_size]);
            let attended = layer
                .attention_output
                .forward(&context)
                .dropout(hidden_dropout, train);
            x = layer.attention_norm.forward(&(attended + &x));
            let inner = activation(&config.hidden_act, &layer.intermediate.forward(&x));
            let out = layer.output.forward(&inner).dropout(hidden_dropout, train);
            x = layer.output_norm.forward(&(out + &x));
        }
        let pooled = self.pooler.forward(&x.select(1, 0)).tanh();
        let classifier_dropout = if train {
            config
                .classifier_dropout
                .unwrap_or(config.hidden_dropout_prob)
        } else {
            0.0
        };
        self.classifier
            .forward(&pooled.dropout(classifier_dropout, train))
    }
}

fn lowest(kind: Kind) -> f64 {
    match kind {
        Kind::Half => f64::from(-65504.0f32),
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Double => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

fn activation(name: &str, x: &Tensor) -> Tensor {
    match name {
        "relu" => x.relu(),
        "gelu_new" | "gelu_pytorch_tanh" => x.gelu("tanh"),
        _ => x.gelu("none"),
    }
}

/// What loading pretrained weights did, for the log.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// Parameters the file did not have and that keep their fresh initialisation (the
    /// classification head of an encoder-only checkpoint).
    pub fresh: Vec<String>,
}

/// Copies the weights of a Hugging Face `model.safetensors` into `vars`. Names are matched as
/// transformers does: a checkpoint of the bare encoder (keys without `bert.`) loads into the
/// encoder, old `gamma`/`beta` names into LayerNorm weights. Only the pooler and classifier may
/// be missing; a missing encoder weight or a shape mismatch is an error that names it.
pub fn load_weights(vars: &nn::VarStore, path: &Path) -> Result<LoadReport, ModelError> {
    let file_error = |message: String| ModelError::File {
        path: path.into(),
        message,
    };
    let tensors = Tensor::read_safetensors(path).map_err(|e| file_error(e.to_string()))?;
    let mut found: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, tensor) in tensors {
        let name = name
            .replace("LayerNorm.gamma", "LayerNorm.weight")
            .replace("LayerNorm.beta", "LayerNorm.bias");
        let name = if name.starts_with("bert.") || name.starts_with("classifier.") {
            name
        } else {
            format!("bert.{name}")
        };
        found.insert(name, tensor);
    }
    let mut report = LoadReport::default();
    let mut variables = vars.variables();
    let mut names: Vec<String> = variables.keys().cloned().collect();
    names.sort();
    tch::no_grad(|| {
        for name in names {
            let Some(target) = variables.get_mut(&name) else {
                continue;
            };
            match found.get(&name) {
                Some(source) => {
                    if source.size() != target.size() {
                        return Err(file_error(format!(
                            "{name} has shape {:?}, the model expects {:?}",
                            source.size(),
                            target.size()
                        )));
                    }
                    target.copy_(&source.to_kind(target.kind()));
                    report.loaded += 1;
                }
                None if name.starts_with("bert.pooler.") || name.starts_with("classifier.") => {
                    report.fresh.push(name);
                }
                None => return Err(file_error(format!("has no {name}"))),
            }
        }
        Ok(())
    })?;
    Ok(report)
}

/// Every parameter by name, sorted: the fixed order for checksums, checkpoints and broadcasts.
pub fn named_parameters(vars: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}
