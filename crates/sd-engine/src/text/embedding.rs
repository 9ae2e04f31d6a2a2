//! Textual-inversion embeddings, used by name in the prompt as AUTOMATIC1111 does.
//!
//! Files (`.safetensors` only) in the layouts Civitai ships:
//! - A1111: `emb_params` `[n, 768 | 1024]` (or `string_to_param.*`, one tensor);
//! - diffusers: a single tensor named after its token (e.g. `<cat-toy>`), `[n, d]` or `[d]`;
//! - SDXL: `clip_l` `[n, 768]` and `clip_g` `[n, 1280]`.
//!
//! The trigger is the name the host gives (A1111: the file stem). As in A1111 it is matched on
//! token ids: the name is tokenized like prompt text, and wherever a prompt run's tokens contain
//! that sequence, the embedding's n vectors take n positions (see
//! [`crate::text::conditioning::chunk_prompt_with`]). Those positions carry ids past the CLIP
//! vocabulary ([`EmbeddingVocab`]), which the text encoders map onto the appended vectors
//! ([`crate::models::clip::ClipTextModel::set_extra_tokens`]).

use std::path::Path;

use candle_core::Tensor;

use crate::safetensors_file;
use crate::text::conditioning::CHUNK_LEN;
use crate::text::tokenizer::ClipTokenizer;
use crate::{EngineError, Result};

/// The vectors of one embedding file, f32 on the CPU.
#[derive(Debug, Clone)]
pub enum Vectors {
    /// One text encoder (SD 1.x: 768 wide, SD 2.x: 1024 wide): `[n, d]`.
    Single(Tensor),
    /// SDXL: CLIP-L `[n, 768]` and OpenCLIP-G `[n, 1280]`.
    Sdxl { clip_l: Tensor, clip_g: Tensor },
}

/// A loaded embedding file.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub name: String,
    pub vectors: Vectors,
}

impl Embedding {
    /// Number of token positions the embedding fills.
    pub fn count(&self) -> usize {
        match &self.vectors {
            Vectors::Single(t) | Vectors::Sdxl { clip_l: t, .. } => t.dims()[0],
        }
    }

    /// Vector widths, one per text encoder it is made for.
    pub fn widths(&self) -> Vec<usize> {
        match &self.vectors {
            Vectors::Single(t) => vec![t.dims()[1]],
            Vectors::Sdxl { clip_l, clip_g } => vec![clip_l.dims()[1], clip_g.dims()[1]],
        }
    }

    fn tables(&self) -> Vec<&Tensor> {
        match &self.vectors {
            Vectors::Single(t) => vec![t],
            Vectors::Sdxl { clip_l, clip_g } => vec![clip_l, clip_g],
        }
    }
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> EngineError {
    EngineError::UnknownModel(format!("{}: {msg}", path.display()))
}

/// `[d]` → `[1, d]`; checks rank and size.
fn as_rows(path: &Path, key: &str, t: Tensor) -> Result<Tensor> {
    let t = match t.rank() {
        1 => t.unsqueeze(0)?,
        2 => t,
        _ => {
            return Err(bad(
                path,
                format!("embedding tensor {key:?} has shape {:?}", t.dims()),
            ))
        }
    };
    let (n, d) = t.dims2()?;
    if n == 0 || d == 0 {
        return Err(bad(path, format!("embedding tensor {key:?} is empty")));
    }
    if n > CHUNK_LEN {
        return Err(bad(
            path,
            format!("embedding has {n} vectors; at most {CHUNK_LEN} fit in a prompt chunk"),
        ));
    }
    Ok(t)
}

/// Read an embedding file (see the module docs for the accepted layouts).
pub fn load_embedding(path: &Path, name: &str) -> Result<Embedding> {
    if name.trim().is_empty() {
        return Err(bad(path, "embedding name is empty"));
    }
    let file = safetensors_file::open(path)?;
    let h = file.header();
    let keys: Vec<&String> = h.tensors.keys().collect();
    let vectors = if h.contains("clip_l") && h.contains("clip_g") {
        let l = as_rows(path, "clip_l", file.tensor_f32("clip_l")?)?;
        let g = as_rows(path, "clip_g", file.tensor_f32("clip_g")?)?;
        if l.dims()[0] != g.dims()[0] {
            return Err(bad(
                path,
                format!(
                    "clip_l has {} vectors but clip_g has {}",
                    l.dims()[0],
                    g.dims()[0]
                ),
            ));
        }
        Vectors::Sdxl {
            clip_l: l,
            clip_g: g,
        }
    } else if h.contains("emb_params") {
        Vectors::Single(as_rows(path, "emb_params", file.tensor_f32("emb_params")?)?)
    } else if keys.len() == 1 {
        // diffusers (`<token>`) or a single `string_to_param.*` entry.
        let key = keys[0].as_str();
        Vectors::Single(as_rows(path, key, file.tensor_f32(key)?)?)
    } else {
        let shown: Vec<&str> = keys.iter().take(4).map(|k| k.as_str()).collect();
        return Err(bad(
            path,
            format!(
                "not a textual-inversion embedding ({} tensors: {shown:?}...)",
                keys.len()
            ),
        ));
    };
    Ok(Embedding {
        name: name.to_string(),
        vectors,
    })
}

/// Which embeddings fit text encoders of the given widths (one width per encoder, in order),
/// and the per-encoder tables `[Σn, width]` of those that do, in input order.
/// Returns (indices of usable embeddings, tables, (name, reason) of the others).
#[allow(clippy::type_complexity)]
pub fn tables_for(
    embeddings: &[Embedding],
    widths: &[usize],
) -> Result<(Vec<usize>, Vec<Option<Tensor>>, Vec<(String, String)>)> {
    let mut usable = Vec::new();
    let mut skipped = Vec::new();
    for (i, e) in embeddings.iter().enumerate() {
        let w = e.widths();
        if w == widths {
            usable.push(i);
        } else {
            skipped.push((
                e.name.clone(),
                format!("vectors are {w:?} wide, the checkpoint's text encoders {widths:?}"),
            ));
        }
    }
    let mut tables = Vec::with_capacity(widths.len());
    for enc in 0..widths.len() {
        if usable.is_empty() {
            tables.push(None);
            continue;
        }
        let parts: Vec<&Tensor> = usable
            .iter()
            .map(|&i| embeddings[i].tables()[enc])
            .collect();
        tables.push(Some(Tensor::cat(&parts, 0)?));
    }
    Ok((usable, tables, skipped))
}

/// One embedding as the prompt chunker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabEntry {
    pub name: String,
    /// Token ids of the name: the sequence that triggers the embedding.
    pub ids: Vec<u32>,
    /// Id of the first vector; vector `k` is `first_id + k`.
    pub first_id: u32,
    pub vectors: usize,
}

/// Trigger token sequences of the active embeddings and the ids their vectors take.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmbeddingVocab {
    entries: Vec<VocabEntry>,
}

impl EmbeddingVocab {
    /// `embeddings`: (name, vector count) in table order; their vectors get consecutive ids from
    /// `first_id` (the encoders' vocabulary size). Names whose token sequence repeats an earlier
    /// one are returned as skipped, (name, reason).
    pub fn new(
        tok: &ClipTokenizer,
        embeddings: &[(String, usize)],
        first_id: u32,
    ) -> (Self, Vec<(String, String)>) {
        let mut entries: Vec<VocabEntry> = Vec::new();
        let mut skipped = Vec::new();
        let mut next = first_id;
        for (name, n) in embeddings {
            let ids = tok.encode(name);
            let id = next;
            // Ids stay reserved even for skipped entries so they line up with the tables.
            next = next.saturating_add(*n as u32);
            if ids.is_empty() {
                skipped.push((name.clone(), "name has no tokens".to_string()));
                continue;
            }
            if let Some(prev) = entries.iter().find(|e| e.ids == ids) {
                skipped.push((
                    name.clone(),
                    format!("same trigger tokens as {:?}", prev.name),
                ));
                continue;
            }
            entries.push(VocabEntry {
                name: name.clone(),
                ids,
                first_id: id,
                vectors: *n,
            });
        }
        (Self { entries }, skipped)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[VocabEntry] {
        &self.entries
    }

    /// The embedding whose trigger starts at `tokens[pos]`; the longest one when several do
    /// (A1111 tries candidates longest first).
    pub fn find_at(&self, tokens: &[u32], pos: usize) -> Option<&VocabEntry> {
        let rest = tokens.get(pos..)?;
        self.entries
            .iter()
            .filter(|e| rest.starts_with(&e.ids))
            .max_by_key(|e| e.ids.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors_file::{serialize, Dtype};
    use std::collections::BTreeMap;

    fn write(
        dir: &Path,
        name: &str,
        tensors: &[(&str, Vec<usize>, Vec<f32>)],
    ) -> std::path::PathBuf {
        let t: Vec<_> = tensors
            .iter()
            .map(|(k, s, v)| {
                let b: Vec<u8> = v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect();
                (k.to_string(), Dtype::F16, s.clone(), b)
            })
            .collect();
        let p = dir.join(name);
        std::fs::write(&p, serialize(&t, &BTreeMap::new()).expect("ser")).expect("write");
        p
    }

    #[test]
    fn reads_every_layout() {
        let dir = tempfile::tempdir().expect("tmp");
        let a1111 = write(
            dir.path(),
            "a.safetensors",
            &[("emb_params", vec![2, 4], vec![0.5; 8])],
        );
        let e = load_embedding(&a1111, "a").expect("a1111");
        assert_eq!((e.count(), e.widths()), (2, vec![4]));
        let diff = write(
            dir.path(),
            "d.safetensors",
            &[("<tok>", vec![4], vec![1.0; 4])],
        );
        let e = load_embedding(&diff, "d").expect("diffusers");
        assert_eq!((e.count(), e.widths()), (1, vec![4]));
        let xl = write(
            dir.path(),
            "x.safetensors",
            &[
                ("clip_l", vec![3, 4], vec![0.0; 12]),
                ("clip_g", vec![3, 8], vec![0.0; 24]),
            ],
        );
        let e = load_embedding(&xl, "x").expect("sdxl");
        assert_eq!((e.count(), e.widths()), (3, vec![4, 8]));
        let bad = write(
            dir.path(),
            "b.safetensors",
            &[
                ("clip_l", vec![3, 4], vec![0.0; 12]),
                ("clip_g", vec![2, 8], vec![0.0; 16]),
            ],
        );
        assert!(load_embedding(&bad, "b").is_err());
        let many = write(
            dir.path(),
            "m.safetensors",
            &[("p", vec![1], vec![0.0]), ("q", vec![1], vec![0.0])],
        );
        assert!(load_embedding(&many, "m").is_err());
        let long = write(
            dir.path(),
            "l.safetensors",
            &[("emb_params", vec![76, 1], vec![0.0; 76])],
        );
        assert!(load_embedding(&long, "l").is_err());
    }

    #[test]
    fn tables_pick_matching_widths() {
        let dev = candle_core::Device::Cpu;
        let mk = |n: usize, d: usize, v: f32| Tensor::full(v, (n, d), &dev).expect("t");
        let embs = vec![
            Embedding {
                name: "a".into(),
                vectors: Vectors::Single(mk(2, 4, 1.0)),
            },
            Embedding {
                name: "b".into(),
                vectors: Vectors::Single(mk(1, 6, 2.0)),
            },
            Embedding {
                name: "c".into(),
                vectors: Vectors::Single(mk(3, 4, 3.0)),
            },
            Embedding {
                name: "x".into(),
                vectors: Vectors::Sdxl {
                    clip_l: mk(1, 4, 0.0),
                    clip_g: mk(1, 8, 0.0),
                },
            },
        ];
        let (usable, tables, skipped) = tables_for(&embs, &[4]).expect("tables");
        assert_eq!(usable, vec![0, 2]);
        assert_eq!(skipped.len(), 2);
        let t = tables[0].as_ref().expect("table");
        assert_eq!(t.dims(), &[5, 4]);
        let col: Vec<f32> = t
            .narrow(1, 0, 1)
            .expect("n")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        assert_eq!(col, vec![1.0, 1.0, 3.0, 3.0, 3.0]);
        let (usable, tables, _) = tables_for(&embs, &[4, 8]).expect("tables");
        assert_eq!(usable, vec![3]);
        assert_eq!(tables.len(), 2);
    }

    #[test]
    fn vocab_matches_longest_token_sequence() {
        let tok = ClipTokenizer::new();
        let (v, skipped) = EmbeddingVocab::new(
            &tok,
            &[
                ("bad".into(), 2),
                ("bad-hands".into(), 3),
                ("BAD".into(), 1),
            ],
            49408,
        );
        assert_eq!(skipped.len(), 1, "BAD tokenizes like bad");
        let t = tok.encode("a bad-hands photo");
        let e = v.find_at(&t, 1).expect("match");
        assert_eq!(
            (e.name.as_str(), e.first_id, e.vectors),
            ("bad-hands", 49410, 3)
        );
        let t = tok.encode("a bad photo");
        assert_eq!(v.find_at(&t, 1).map(|e| e.first_id), Some(49408));
        assert!(v.find_at(&t, 0).is_none());
        assert!(v.find_at(&t, 99).is_none());
    }
}
