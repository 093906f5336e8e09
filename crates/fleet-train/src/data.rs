//! The labelled text table: a CSV file (RFC 4180) read into texts and label indices, its seeded
//! train/validation split, and each epoch's shuffled, equal-sized shard per rank (the semantics
//! of PyTorch's DistributedSampler).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Row {
        path: PathBuf,
        line: u64,
        message: String,
    },
}

/// Every row of the file, labels as indices into `labels`.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub texts: Vec<String>,
    pub targets: Vec<i64>,
    /// Label names in index order: integers sorted numerically, otherwise strings sorted.
    pub labels: Vec<String>,
    /// SHA-256 of the file's bytes, compared across ranks before training.
    pub sha256: String,
}

impl Dataset {
    pub fn load(path: &Path, text_column: &str, label_column: &str) -> Result<Dataset, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &bytes, text_column, label_column)
    }

    pub fn parse(
        path: &Path,
        bytes: &[u8],
        text_column: &str,
        label_column: &str,
    ) -> Result<Dataset, DataError> {
        let format = |message: String| DataError::Format {
            path: path.into(),
            message,
        };
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(format(
                "the file is empty (a header row and data rows are needed)".into(),
            ));
        }
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(bytes);
        let headers = reader.headers().map_err(|e| row_error(path, &e))?.clone();
        let column = |name: &str| {
            headers
                .iter()
                .position(|h| h.trim() == name)
                .ok_or_else(|| {
                    let found = headers.iter().map(|h| format!("{h:?}")).collect::<Vec<_>>();
                    format(format!(
                        "no column {name:?}; the header has {}",
                        found.join(", ")
                    ))
                })
        };
        let (text_at, label_at) = (column(text_column)?, column(label_column)?);

        let mut texts = Vec::new();
        let mut raw_labels = Vec::new();
        for record in reader.records() {
            let record = record.map_err(|e| row_error(path, &e))?;
            let line = record.position().map_or(0, |p| p.line());
            let label = record.get(label_at).unwrap_or_default().trim();
            if label.is_empty() {
                return Err(DataError::Row {
                    path: path.into(),
                    line,
                    message: format!("empty {label_column:?}"),
                });
            }
            texts.push(record.get(text_at).unwrap_or_default().to_string());
            raw_labels.push(label.to_string());
        }
        if texts.is_empty() {
            return Err(format("no data rows after the header".into()));
        }

        let labels = sorted_labels(&raw_labels);
        let targets = raw_labels
            .iter()
            .map(|label| labels.iter().position(|l| l == label).unwrap_or_default() as i64)
            .collect();
        Ok(Dataset {
            texts,
            targets,
            labels,
            sha256: hex::encode(Sha256::digest(bytes)),
        })
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }
}

fn row_error(path: &Path, error: &csv::Error) -> DataError {
    let line = error.position().map_or(0, |p| p.line());
    let message = match error.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            format!("this row has {len} fields, the header {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_string(),
        _ => error.to_string(),
    };
    DataError::Row {
        path: path.into(),
        line,
        message,
    }
}

fn sorted_labels(raw: &[String]) -> Vec<String> {
    let mut labels: Vec<String> = raw.to_vec();
    labels.sort();
    labels.dedup();
    if labels.iter().all(|l| l.parse::<i64>().is_ok()) {
        labels.sort_by_key(|l| l.parse::<i64>().unwrap_or_default());
    }
    labels
}

/// A small seeded generator (SplitMix64): the same sequence on every machine and version, which
/// the split, the shuffles and the synthetic data all rely on.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Row indices for training and for validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
}

impl Split {
    /// A seeded split; at least one row each when there are two or more rows.
    pub fn new(rows: usize, validation_fraction: f64, seed: u64) -> Split {
        let mut order: Vec<usize> = (0..rows).collect();
        SplitMix::new(seed ^ 0x5EED_5A17).shuffle(&mut order);
        let wanted = (rows as f64 * validation_fraction).round() as usize;
        let validation_len = if validation_fraction > 0.0 && rows > 1 {
            wanted.clamp(1, rows - 1)
        } else {
            0
        };
        let validation = order[..validation_len].to_vec();
        let train = order[validation_len..].to_vec();
        Split { train, validation }
    }
}

/// This rank's rows for one epoch: the epoch's seeded permutation, padded by wrapping around to
/// a multiple of the world size, then every `world_size`-th row from `rank` on. Every rank gets
/// the same count, and the ranks' batches at one step together are the permutation's rows at
/// that step, which is what one process would take with the whole batch.
pub fn shard(rows: &[usize], epoch: u64, seed: u64, rank: usize, world_size: usize) -> Vec<usize> {
    if rows.is_empty() {
        return Vec::new();
    }
    let mut order = rows.to_vec();
    SplitMix::new(seed.wrapping_add(epoch)).shuffle(&mut order);
    let per_rank = order.len().div_ceil(world_size);
    (0..per_rank)
        .map(|i| order[(i * world_size + rank) % order.len()])
        .collect()
}

/// Validation rows are split without shuffling or padding, so each row is counted once.
pub fn shard_unpadded(rows: &[usize], rank: usize, world_size: usize) -> Vec<usize> {
    rows.iter()
        .skip(rank)
        .step_by(world_size)
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Dataset, DataError> {
        Dataset::parse(Path::new("d.csv"), text.as_bytes(), "text", "label")
    }

    #[test]
    fn quoted_fields_newlines_and_korean() {
        let data =
            parse("id,text,label\n1,\"안녕, \"\"세계\"\"\nline two\",pos\n2,plain,neg\n").unwrap();
        assert_eq!(data.texts, ["안녕, \"세계\"\nline two", "plain"]);
        assert_eq!(data.labels, ["neg", "pos"]);
        assert_eq!(data.targets, [1, 0]);
    }

    #[test]
    fn integer_labels_sort_numerically() {
        let data = parse("text,label\na,10\nb,2\nc,-1\n").unwrap();
        assert_eq!(data.labels, ["-1", "2", "10"]);
        assert_eq!(data.targets, [2, 1, 0]);
    }

    #[test]
    fn errors_name_the_line_or_column() {
        let short = parse("text,label\na,1\nb\n").unwrap_err().to_string();
        assert_eq!(short, "d.csv:3: this row has 1 fields, the header 2");
        let missing = parse("body,label\na,1\n").unwrap_err().to_string();
        assert_eq!(
            missing,
            "d.csv: no column \"text\"; the header has \"body\", \"label\""
        );
        assert!(parse("").unwrap_err().to_string().contains("empty"));
        assert!(
            parse("text,label\n")
                .unwrap_err()
                .to_string()
                .contains("no data rows")
        );
        let empty_label = parse("text,label\na,1\nb,\n").unwrap_err().to_string();
        assert_eq!(empty_label, "d.csv:3: empty \"label\"");
        let bad_utf8 = Dataset::parse(Path::new("d.csv"), b"text,label\n\xff,1\n", "text", "label");
        assert_eq!(
            bad_utf8.unwrap_err().to_string(),
            "d.csv:2: not valid UTF-8"
        );
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let a = Split::new(100, 0.2, 7);
        assert_eq!(a, Split::new(100, 0.2, 7));
        assert_ne!(a, Split::new(100, 0.2, 8));
        assert_eq!(a.validation.len(), 20);
        let mut all: Vec<usize> = a.train.iter().chain(&a.validation).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn shards_are_equal_and_cover_the_permutation() {
        let rows: Vec<usize> = (0..10).collect();
        let shards: Vec<Vec<usize>> = (0..3).map(|r| shard(&rows, 1, 9, r, 3)).collect();
        assert!(shards.iter().all(|s| s.len() == 4));
        let whole = shard(&rows, 1, 9, 0, 1);
        // Step i's rows over all ranks are the single process's rows 3i..3i+3.
        for i in 0..3 {
            let mut step: Vec<usize> = shards.iter().map(|s| s[i]).collect();
            let mut single = whole[3 * i..3 * i + 3].to_vec();
            step.sort();
            single.sort();
            assert_eq!(step, single);
        }
        assert_ne!(shard(&rows, 1, 9, 0, 1), shard(&rows, 2, 9, 0, 1));
    }
}
