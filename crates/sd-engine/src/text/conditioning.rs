//! Prompt → text-encoder conditioning, the AUTOMATIC1111 way.
//!
//! * [`chunk_prompt`] reproduces A1111's `tokenize_line` (modules/sd_hijack_clip.py): the prompt is
//!   parsed for attention weights, each (text, weight) run is tokenized on its own, and tokens are
//!   packed into chunks of 75. `BREAK` closes the current chunk. When a chunk is full and the last
//!   comma is at most 20 tokens back (A1111's default `comma_padding_backtrack`), the tokens after
//!   that comma move to the next chunk. An empty prompt gives one empty chunk.
//! * [`encode_prompt`] encodes every chunk with a [`ChunkEncoder`] (which adds BOS/EOS/padding and
//!   picks the layer), multiplies each position's hidden state by its weight and rescales so the
//!   mean of the chunk's hidden states is unchanged (A1111's "Original" emphasis), then concatenates
//!   the chunks along the token axis.
//!
//! Textual-inversion embeddings ([`chunk_prompt_with`]): at each token position the chunker asks
//! an [`EmbeddingVocab`] whether an embedding's name (as a token sequence) starts there. As in
//! A1111's `tokenize_line`, a match of N vectors occupies N positions with the run's weight,
//! moving to a new chunk first if they would not fit. Instead of A1111's placeholder ids plus a
//! list of fixes, the positions hold the vectors' own ids past the CLIP vocabulary, which the text
//! encoder maps onto the appended vectors; so the vectors also travel correctly when the comma
//! backtrack moves them into the next chunk (A1111 leaves its fixes behind there).

use candle_core::{DType, Tensor};

use super::embedding::EmbeddingVocab;
use super::prompt::{parse_attention_f64, BREAK_TEXT};
use super::tokenizer::{ClipTokenizer, COMMA};

/// Real tokens per chunk (77 with BOS and EOS).
pub const CHUNK_LEN: usize = 75;
/// Positions per encoded chunk.
pub const CONTEXT_LEN: usize = CHUNK_LEN + 2;
/// A1111's default `comma_padding_backtrack`.
pub const COMMA_BACKTRACK: usize = 20;

/// Up to 75 token ids (no BOS/EOS/padding) with one weight each.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WeightedChunk {
    pub tokens: Vec<u32>,
    pub weights: Vec<f32>,
}

impl WeightedChunk {
    /// Weight of each of the 77 encoder positions: 1.0 for BOS, EOS and padding.
    pub fn position_weights(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(CONTEXT_LEN);
        w.push(1.0);
        w.extend_from_slice(&self.weights);
        w.resize(CONTEXT_LEN, 1.0);
        w
    }

    fn is_unweighted(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }
}

/// Splits a prompt (A1111 syntax, LoRA tags already removed) into weighted 75-token chunks.
pub fn chunk_prompt(tok: &ClipTokenizer, prompt: &str) -> Vec<WeightedChunk> {
    chunk_prompt_with(tok, prompt, &EmbeddingVocab::default())
}

/// [`chunk_prompt`] that also replaces embedding names with their vector ids.
pub fn chunk_prompt_with(
    tok: &ClipTokenizer,
    prompt: &str,
    vocab: &EmbeddingVocab,
) -> Vec<WeightedChunk> {
    let mut chunks: Vec<WeightedChunk> = Vec::new();
    let mut cur = WeightedChunk::default();
    // Index in `cur.tokens` of the last comma, reset with every new chunk.
    let mut last_comma: Option<usize> = None;

    for (text, weight) in parse_attention_f64(prompt) {
        if text == BREAK_TEXT && weight == -1.0 {
            chunks.push(std::mem::take(&mut cur));
            last_comma = None;
            continue;
        }
        let w = weight as f32;
        let tokens = tok.encode(&text);
        let mut pos = 0;
        while pos < tokens.len() {
            let token = tokens[pos];
            if token == COMMA {
                last_comma = Some(cur.tokens.len());
            } else if cur.tokens.len() == CHUNK_LEN {
                if let Some(comma) = last_comma.filter(|&c| CHUNK_LEN - c <= COMMA_BACKTRACK) {
                    // Move everything after the comma into the next chunk.
                    let moved = WeightedChunk {
                        tokens: cur.tokens.split_off(comma + 1),
                        weights: cur.weights.split_off(comma + 1),
                    };
                    chunks.push(std::mem::replace(&mut cur, moved));
                    last_comma = None;
                }
            }
            if cur.tokens.len() == CHUNK_LEN {
                chunks.push(std::mem::take(&mut cur));
                last_comma = None;
            }
            match vocab.find_at(&tokens, pos) {
                None => {
                    cur.tokens.push(token);
                    cur.weights.push(w);
                    pos += 1;
                }
                Some(e) => {
                    if cur.tokens.len() + e.vectors > CHUNK_LEN {
                        chunks.push(std::mem::take(&mut cur));
                        last_comma = None;
                    }
                    cur.tokens
                        .extend((0..e.vectors as u32).map(|k| e.first_id + k));
                    cur.weights.extend(std::iter::repeat_n(w, e.vectors));
                    pos += e.ids.len();
                }
            }
        }
    }
    if !cur.tokens.is_empty() || chunks.is_empty() {
        chunks.push(cur);
    }
    chunks
}

/// The model side of prompt encoding (implemented by the CLIP text encoder wrapper).
pub trait ChunkEncoder {
    /// tokens: ≤ 75 real ids without BOS/EOS. Returns hidden [77, D] and an optional pooled vector [P].
    fn encode_chunk(
        &self,
        tokens: &[u32],
        clip_skip: usize,
    ) -> crate::Result<(candle_core::Tensor, Option<candle_core::Tensor>)>;

    /// Widths of the parts of the hidden dimension that come from separate text encoders, e.g.
    /// `[768, 1280]` for SDXL's CLIP-L + OpenCLIP-G. A1111 applies the emphasis mean-restore to each
    /// encoder's output on its own, so it is done per part here. Empty (the default) = one part.
    fn hidden_parts(&self) -> Vec<usize> {
        Vec::new()
    }
}

/// Encoded prompt.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// [1, 77 * chunks, D]
    pub context: Tensor,
    /// [1, P] pooled output of the first chunk (unweighted, as in A1111), when the encoder has one.
    pub pooled: Option<Tensor>,
}

impl Conditioning {
    /// Number of 77-token chunks in `context`.
    pub fn chunks(&self) -> usize {
        self.context.dims().get(1).copied().unwrap_or(0) / CONTEXT_LEN
    }
}

/// Encodes a prompt into at least `min_chunks` chunks (extra chunks are empty prompts).
pub fn encode_prompt(
    tok: &ClipTokenizer,
    enc: &dyn ChunkEncoder,
    prompt: &str,
    clip_skip: usize,
    min_chunks: usize,
) -> crate::Result<Conditioning> {
    encode_chunks(enc, chunk_prompt(tok, prompt), clip_skip, min_chunks)
}

/// Positive and negative with equal chunk counts (the shorter padded with empty chunks, as A1111 does).
pub fn encode_pair(
    tok: &ClipTokenizer,
    enc: &dyn ChunkEncoder,
    prompt: &str,
    negative: &str,
    clip_skip: usize,
) -> crate::Result<(Conditioning, Conditioning)> {
    encode_pair_with(
        tok,
        enc,
        prompt,
        negative,
        clip_skip,
        &EmbeddingVocab::default(),
    )
}

/// [`encode_pair`] with textual-inversion embeddings (the encoder must hold their vectors).
pub fn encode_pair_with(
    tok: &ClipTokenizer,
    enc: &dyn ChunkEncoder,
    prompt: &str,
    negative: &str,
    clip_skip: usize,
    vocab: &EmbeddingVocab,
) -> crate::Result<(Conditioning, Conditioning)> {
    let pos = chunk_prompt_with(tok, prompt, vocab);
    let neg = chunk_prompt_with(tok, negative, vocab);
    let n = pos.len().max(neg.len());
    Ok((
        encode_chunks(enc, pos, clip_skip, n)?,
        encode_chunks(enc, neg, clip_skip, n)?,
    ))
}

fn encode_chunks(
    enc: &dyn ChunkEncoder,
    mut chunks: Vec<WeightedChunk>,
    clip_skip: usize,
    min_chunks: usize,
) -> crate::Result<Conditioning> {
    if chunks.len() < min_chunks {
        chunks.resize(min_chunks, WeightedChunk::default());
    }
    let parts = enc.hidden_parts();
    let mut zs = Vec::with_capacity(chunks.len());
    let mut pooled = None;
    for (i, chunk) in chunks.iter().enumerate() {
        let (z, p) = enc.encode_chunk(&chunk.tokens, clip_skip)?;
        let dims = z.dims();
        if dims.len() != 2 || dims[0] != CONTEXT_LEN {
            return Err(crate::EngineError::InvalidParam(format!(
                "text encoder returned hidden states of shape {dims:?}, expected [{CONTEXT_LEN}, D]"
            )));
        }
        let z = if chunk.is_unweighted() {
            z
        } else {
            apply_emphasis(&z, chunk, &parts)?
        };
        if i == 0 {
            pooled = match p {
                Some(p) if p.rank() == 1 => Some(p.unsqueeze(0)?),
                other => other,
            };
        }
        zs.push(z);
    }
    let context = Tensor::cat(&zs, 0)?.unsqueeze(0)?;
    Ok(Conditioning { context, pooled })
}

/// A1111 "Original" emphasis: z *= w[:, None], then z *= mean(z_before) / mean(z_after), per part.
fn apply_emphasis(z: &Tensor, chunk: &WeightedChunk, parts: &[usize]) -> crate::Result<Tensor> {
    let dtype = z.dtype();
    let z32 = z.to_dtype(DType::F32)?;
    let width = z32.dim(1)?;
    let parts: Vec<usize> = if parts.is_empty() {
        vec![width]
    } else {
        parts.to_vec()
    };
    if parts.iter().sum::<usize>() != width {
        return Err(crate::EngineError::InvalidParam(format!(
            "text encoder parts {parts:?} do not add up to its width {width}"
        )));
    }
    let w = Tensor::from_vec(chunk.position_weights(), (CONTEXT_LEN, 1), z32.device())?;
    let mut out = Vec::with_capacity(parts.len());
    let mut start = 0;
    for len in parts {
        let part = z32.narrow(1, start, len)?;
        start += len;
        let original_mean = part.mean_all()?.to_scalar::<f32>()?;
        let weighted = part.broadcast_mul(&w)?;
        let new_mean = weighted.mean_all()?.to_scalar::<f32>()?;
        let scale = original_mean / new_mean;
        // A zero mean would turn the whole chunk into NaN/inf; keep the plain weighting then.
        out.push(if scale.is_finite() {
            weighted.affine(scale as f64, 0.0)?
        } else {
            weighted
        });
    }
    let z = if out.len() == 1 {
        out.remove(0)
    } else {
        Tensor::cat(&out, 1)?
    };
    Ok(z.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tokenizer::{BOS, EOS};
    use candle_core::Device;
    use serde_json::Value;
    use std::cell::RefCell;

    const FIXTURE: &str = include_str!("../../tests/fixtures/text/a1111_chunks.json");

    /// Embeds each position deterministically from its token id (padding with EOS like SD 1.x);
    /// records the token lists it was asked for.
    struct FakeEncoder {
        width: usize,
        parts: Vec<usize>,
        calls: RefCell<Vec<Vec<u32>>>,
    }

    impl FakeEncoder {
        fn new(width: usize) -> Self {
            Self {
                width,
                parts: Vec::new(),
                calls: RefCell::new(Vec::new()),
            }
        }

        fn ids(tokens: &[u32]) -> Vec<u32> {
            let mut ids = vec![BOS];
            ids.extend_from_slice(tokens);
            ids.resize(CONTEXT_LEN, EOS);
            ids
        }

        fn value(id: u32, pos: usize, d: usize) -> f32 {
            // Positive values with some spread, so means are well defined.
            1.0 + ((id as usize * 31 + pos * 7 + d * 13) % 97) as f32 / 97.0
        }

        fn hidden(&self, tokens: &[u32]) -> Vec<f32> {
            let ids = Self::ids(tokens);
            let mut v = Vec::with_capacity(CONTEXT_LEN * self.width);
            for (pos, &id) in ids.iter().enumerate() {
                for d in 0..self.width {
                    v.push(Self::value(id, pos, d));
                }
            }
            v
        }
    }

    impl ChunkEncoder for FakeEncoder {
        fn encode_chunk(
            &self,
            tokens: &[u32],
            clip_skip: usize,
        ) -> crate::Result<(Tensor, Option<Tensor>)> {
            assert!(tokens.len() <= CHUNK_LEN);
            assert_eq!(clip_skip, 2);
            self.calls.borrow_mut().push(tokens.to_vec());
            let z = Tensor::from_vec(self.hidden(tokens), (CONTEXT_LEN, self.width), &Device::Cpu)?;
            let pooled = Tensor::from_vec(vec![tokens.len() as f32; 3], 3, &Device::Cpu)?;
            Ok((z, Some(pooled)))
        }

        fn hidden_parts(&self) -> Vec<usize> {
            self.parts.clone()
        }
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.squeeze(0).and_then(|t| t.to_vec2::<f32>()).expect("2d")
    }

    #[test]
    fn empty_prompt_is_one_empty_chunk() {
        let tok = ClipTokenizer::new();
        assert_eq!(chunk_prompt(&tok, ""), vec![WeightedChunk::default()]);
        assert_eq!(chunk_prompt(&tok, "BREAK").len(), 1);
        assert_eq!(chunk_prompt(&tok, "a BREAK").len(), 1);
        assert_eq!(chunk_prompt(&tok, "a BREAK b").len(), 2);
    }

    #[test]
    fn long_prompt_makes_two_chunks_and_154_positions() {
        let tok = ClipTokenizer::new();
        let prompt = ["cat"; 80].join(" ");
        let chunks = chunk_prompt(&tok, &prompt);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].tokens.len(), 75);
        assert_eq!(chunks[1].tokens.len(), 5);
        let enc = FakeEncoder::new(4);
        let c = encode_prompt(&tok, &enc, &prompt, 2, 1).expect("encode");
        assert_eq!(c.context.dims(), &[1, 154, 4]);
        assert_eq!(c.chunks(), 2);
        // Pooled output comes from the first chunk, shaped [1, P].
        let pooled = c.pooled.expect("pooled");
        assert_eq!(
            pooled.to_vec2::<f32>().expect("pooled"),
            vec![vec![75.0; 3]]
        );
    }

    #[test]
    fn comma_backtrack_moves_words_after_the_last_comma() {
        let tok = ClipTokenizer::new();
        // 70 words, a comma (token 71), then 10 more words: the chunk is cut after the comma.
        let prompt = format!("{}, {}", ["cat"; 70].join(" "), ["dog"; 10].join(" "));
        let chunks = chunk_prompt(&tok, &prompt);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].tokens.len(), 71);
        assert_eq!(*chunks[0].tokens.last().expect("token"), COMMA);
        assert_eq!(chunks[1].tokens.len(), 10);
        // A comma further than 20 tokens back does not move anything.
        let prompt = format!("{}, {}", ["cat"; 40].join(" "), ["dog"; 40].join(" "));
        let chunks = chunk_prompt(&tok, &prompt);
        assert_eq!(chunks[0].tokens.len(), 75);
        assert_eq!(chunks[1].tokens.len(), 6);
    }

    #[test]
    fn weights_and_mean_restore() {
        let tok = ClipTokenizer::new();
        let enc = FakeEncoder::new(6);
        let c = encode_prompt(&tok, &enc, "a (cat:1.5) [dog]", 2, 1).expect("encode");
        let z = rows(&c.context);
        let ids = FakeEncoder::ids(&tok.encode("a cat dog"));
        let w = [1.0f32, 1.0, 1.5, 1.0 / 1.1];
        // Expected: raw * w, then scaled to the raw mean.
        let raw: Vec<Vec<f32>> = (0..CONTEXT_LEN)
            .map(|p| (0..6).map(|d| FakeEncoder::value(ids[p], p, d)).collect())
            .collect();
        let weighted: Vec<Vec<f32>> = raw
            .iter()
            .enumerate()
            .map(|(p, r)| {
                r.iter()
                    .map(|x| x * w.get(p).copied().unwrap_or(1.0))
                    .collect()
            })
            .collect();
        let mean =
            |m: &Vec<Vec<f32>>| m.iter().flatten().map(|&x| x as f64).sum::<f64>() / (77.0 * 6.0);
        let scale = mean(&raw) / mean(&weighted);
        assert!((scale - 1.0).abs() > 1e-4, "weights must change the mean");
        for p in 0..CONTEXT_LEN {
            for d in 0..6 {
                let want = weighted[p][d] as f64 * scale;
                assert!(
                    (z[p][d] as f64 - want).abs() < 1e-5,
                    "pos {p} dim {d}: {} vs {want}",
                    z[p][d]
                );
            }
        }
        assert!((mean(&z) - mean(&raw)).abs() < 1e-5);
    }

    #[test]
    fn unweighted_prompt_is_untouched_and_parts_are_separate() {
        let tok = ClipTokenizer::new();
        let enc = FakeEncoder::new(5);
        let c = encode_prompt(&tok, &enc, "a cat", 2, 1).expect("encode");
        let raw = enc.hidden(&tok.encode("a cat"));
        assert_eq!(
            c.context
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("v"),
            raw
        );

        // With two parts each part keeps its own mean.
        let mut enc = FakeEncoder::new(5);
        enc.parts = vec![2, 3];
        let c = encode_prompt(&tok, &enc, "(a cat:1.8) dog", 2, 1).expect("encode");
        let z = rows(&c.context);
        let raw = enc.hidden(&tok.encode("a cat dog"));
        for (lo, hi) in [(0usize, 2usize), (2, 5)] {
            let got: f64 = z
                .iter()
                .flat_map(|r| r[lo..hi].iter())
                .map(|&x| x as f64)
                .sum();
            let want: f64 = raw
                .chunks(5)
                .flat_map(|r| r[lo..hi].iter())
                .map(|&x| x as f64)
                .sum();
            assert!(
                (got - want).abs() / want < 1e-6,
                "part {lo}..{hi}: {got} vs {want}"
            );
        }
        enc.parts = vec![2, 2];
        assert!(encode_prompt(&tok, &enc, "(a:2)", 2, 1).is_err());
    }

    #[test]
    fn pair_has_equal_chunk_counts() {
        let tok = ClipTokenizer::new();
        let enc = FakeEncoder::new(3);
        let (pos, neg) = encode_pair(&tok, &enc, "a BREAK b BREAK c", "ugly", 2).expect("pair");
        assert_eq!(pos.context.dims(), &[1, 231, 3]);
        assert_eq!(neg.context.dims(), &[1, 231, 3]);
        // The negative's padding chunks are empty prompts.
        {
            let calls = enc.calls.borrow();
            assert_eq!(calls.len(), 6);
            assert_eq!(calls[3], tok.encode("ugly"));
            assert!(calls[4].is_empty() && calls[5].is_empty());
        }
        let (pos, _) = encode_pair(&tok, &enc, "x", "", 2).expect("pair");
        assert_eq!(pos.chunks(), 1);
    }

    #[test]
    fn embeddings_take_their_vector_count() {
        let tok = ClipTokenizer::new();
        let (vocab, _) = EmbeddingVocab::new(&tok, &[("myemb".into(), 3)], 49408);
        let c = chunk_prompt_with(&tok, "a myemb (myemb:1.5) cat", &vocab);
        assert_eq!(c.len(), 1);
        let a = tok.encode("a")[0];
        let cat = tok.encode("cat")[0];
        assert_eq!(
            c[0].tokens,
            vec![a, 49408, 49409, 49410, 49408, 49409, 49410, cat]
        );
        assert_eq!(c[0].weights, vec![1.0, 1.0, 1.0, 1.0, 1.5, 1.5, 1.5, 1.0]);
        // Without the trigger the chunks are the same as without embeddings.
        let p = "a photo of a cat, BREAK my emb";
        assert_eq!(chunk_prompt_with(&tok, p, &vocab), chunk_prompt(&tok, p));
        // Vectors that would cross the 75-token boundary start the next chunk.
        let p = format!("{} myemb", ["cat"; 73].join(" "));
        let c = chunk_prompt_with(&tok, &p, &vocab);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].tokens.len(), 73);
        assert_eq!(c[1].tokens, vec![49408, 49409, 49410]);
        let p = format!("{} myemb", ["cat"; 72].join(" "));
        assert_eq!(chunk_prompt_with(&tok, &p, &vocab).len(), 1);
    }

    #[test]
    fn matches_a1111_chunking_fixture() {
        let fixture: Value = serde_json::from_str(FIXTURE).expect("fixture json");
        let tok = ClipTokenizer::new();
        let cases = fixture["cases"].as_array().expect("cases");
        assert!(!cases.is_empty());
        for case in cases {
            let prompt = case["prompt"].as_str().expect("prompt");
            let want = case["chunks"].as_array().expect("chunks");
            let got = chunk_prompt(&tok, prompt);
            assert_eq!(got.len(), want.len(), "chunk count for {prompt:?}");
            for (k, (g, w)) in got.iter().zip(want).enumerate() {
                // The fixture stores A1111's full 77-position chunks.
                let ids: Vec<u32> = w["tokens"]
                    .as_array()
                    .expect("tokens")
                    .iter()
                    .map(|v| v.as_u64().expect("id") as u32)
                    .collect();
                let mults: Vec<f32> = w["multipliers"]
                    .as_array()
                    .expect("multipliers")
                    .iter()
                    .map(|v| v.as_f64().expect("mult") as f32)
                    .collect();
                assert_eq!(
                    FakeEncoder::ids(&g.tokens),
                    ids,
                    "{prompt:?} chunk {k} tokens"
                );
                let got_bits: Vec<u32> = g.position_weights().iter().map(|x| x.to_bits()).collect();
                let want_bits: Vec<u32> = mults.iter().map(|x| x.to_bits()).collect();
                assert_eq!(got_bits, want_bits, "{prompt:?} chunk {k} multipliers");
            }
        }
    }
}
