//! CLIP BPE tokenizer with OpenAI's vocabulary built in (no download).
//!
//! Matches transformers' `CLIPTokenizer` (the `tokenizers`-backed one of transformers 5, i.e.
//! `CLIPTokenizerFast` of v4, as used by diffusers) token for token on the checked fixtures:
//! the special strings `<|startoftext|>` / `<|endoftext|>` are matched in the raw text, every other
//! character is lowercased one by one, then the text is split into letter runs, single digits and
//! punctuation runs and each piece is BPE-encoded.
//!
//! The BPE itself comes from the `instant-clip-tokenizer` crate (which embeds the same
//! `bpe_simple_vocab_16e6.txt` as open_clip). Two of its quirks are corrected here: it treats the
//! literal text `<start_of_text>` / `<end_of_text>` as special tokens instead of the real
//! `<|…|>` spellings, and it lowercases with context-sensitive final sigma.
//!
//! Known difference: transformers applies Unicode NFC first; this tokenizer does not (the engine has
//! no normalisation tables), so text typed in decomposed form (a letter followed by a combining
//! accent) may tokenize differently. Precomposed text, which is what keyboards produce, is unaffected.

use std::sync::OnceLock;

use instant_clip_tokenizer::{Token, Tokenizer};

/// `<|startoftext|>`.
pub const BOS: u32 = 49406;
/// `<|endoftext|>` (also the padding token of SD 1.x / SDXL's first encoder).
pub const EOS: u32 = 49407;
/// `,</w>`: A1111's chunker cuts after the last comma near a chunk boundary.
pub const COMMA: u32 = 267;
/// Number of entries in the vocabulary.
pub const VOCAB_SIZE: usize = 49408;

/// Literals that instant-clip-tokenizer wrongly turns into BOS/EOS (already lowercased).
const FAKE_SPECIALS: [&str; 2] = ["<start_of_text>", "<end_of_text>"];
/// The real special tokens, matched case-sensitively in the raw text as transformers does.
const SPECIALS: [(&str, u32); 2] = [("<|startoftext|>", BOS), ("<|endoftext|>", EOS)];

fn shared() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    // Parsing the 48k merge rules takes a while, so it is done once per process.
    TOKENIZER.get_or_init(Tokenizer::new)
}

/// CLIP tokenizer. Cheap to create: the vocabulary is parsed once per process and shared.
#[derive(Clone, Copy)]
pub struct ClipTokenizer {
    inner: &'static Tokenizer,
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClipTokenizer")
    }
}

impl ClipTokenizer {
    pub fn new() -> Self {
        Self { inner: shared() }
    }

    /// Token ids of `text` without BOS/EOS (transformers' `add_special_tokens=False`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = SPECIALS
                .iter()
                .filter_map(|&(lit, id)| rest.find(lit).map(|pos| (pos, lit, id)))
                .min_by_key(|&(pos, _, _)| pos);
            match next {
                Some((pos, lit, id)) => {
                    self.encode_plain(&rest[..pos], &mut out);
                    out.push(id);
                    rest = &rest[pos + lit.len()..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    /// Text free of real special tokens.
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        // Per-character lowercasing, as the `tokenizers` Lowercase normaliser does (no final sigma).
        let lower: String = text.chars().flat_map(char::to_lowercase).collect();
        let mut rest = lower.as_str();
        // Cut the text before every fake special that the crate would recognise; the cut falls on a
        // pre-token boundary in both tokenizers, so the pieces can be encoded independently.
        while let Some((pos, lit)) = self.next_fake_special(rest) {
            self.encode_raw(&rest[..pos], out);
            // What transformers produces: "<", "start", "_", "of", "_", "text", then ">" starts the
            // next punctuation run together with whatever punctuation follows.
            self.encode_raw("<", out);
            self.encode_raw(&lit[1..lit.len() - 1], out);
            rest = &rest[pos + lit.len() - 1..];
        }
        self.encode_raw(rest, out);
    }

    /// First occurrence of a fake special token that the crate would actually match, i.e. one whose
    /// `<` begins a pre-token (a preceding punctuation run would otherwise swallow the `<`).
    fn next_fake_special(&self, text: &str) -> Option<(usize, &'static str)> {
        let mut found: Option<(usize, &'static str)> = None;
        for lit in FAKE_SPECIALS {
            let mut from = 0;
            while let Some(rel) = text[from..].find(lit) {
                let pos = from + rel;
                let starts_token = match text[..pos].chars().next_back() {
                    None => true,
                    Some(prev) => {
                        let mut probe = String::with_capacity(lit.len() + 4);
                        probe.push(prev);
                        probe.push_str(lit);
                        let mut toks = Vec::new();
                        self.inner.encode(&probe, &mut toks);
                        toks.iter().any(|t| u32::from(t.to_u16()) >= BOS)
                    }
                };
                if starts_token {
                    if found.is_none_or(|(p, _)| pos < p) {
                        found = Some((pos, lit));
                    }
                    break;
                }
                from = pos + 1;
            }
        }
        found
    }

    /// Straight through the crate (input must be lowercase and free of any special literal).
    fn encode_raw(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut toks: Vec<Token> = Vec::new();
        self.inner.encode(text, &mut toks);
        out.extend(toks.into_iter().map(|t| u32::from(t.to_u16())));
    }

    /// Best-effort text of token ids (for logs and debugging).
    pub fn decode(&self, ids: &[u32]) -> String {
        let toks = ids
            .iter()
            .filter_map(|&id| u16::try_from(id).ok())
            .filter_map(|id| Token::from_u16(id, self.inner));
        self.inner.decode(toks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const FIXTURE: &str = include_str!("../../tests/fixtures/text/clip_tokens.json");

    #[test]
    fn known_ids() {
        let tok = ClipTokenizer::new();
        assert_eq!(
            tok.encode("a photo of a cat"),
            vec![320, 1125, 539, 320, 2368]
        );
        assert_eq!(tok.encode(","), vec![COMMA]);
        assert_eq!(tok.encode(""), Vec::<u32>::new());
        assert_eq!(tok.encode("  \t\n "), Vec::<u32>::new());
        assert_eq!(
            tok.encode("A Photo OF a CAT"),
            tok.encode("a photo of a cat")
        );
        assert_eq!(tok.encode("cat<|endoftext|>"), vec![2368, EOS]);
    }

    #[test]
    fn fake_specials_are_plain_text() {
        let tok = ClipTokenizer::new();
        for text in ["<start_of_text>", "x <end_of_text>!", "!<start_of_text>"] {
            let ids = tok.encode(text);
            assert!(
                !ids.contains(&BOS) && !ids.contains(&EOS),
                "{text}: {ids:?}"
            );
        }
    }

    #[test]
    fn matches_transformers_fixture() {
        let fixture: Value = serde_json::from_str(FIXTURE).expect("fixture json");
        let tok = ClipTokenizer::new();
        let cases = fixture["cases"].as_array().expect("cases");
        assert!(cases.len() >= 15);
        for case in cases {
            let text = case["text"].as_str().expect("text");
            let want: Vec<u32> = case["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect();
            assert_eq!(tok.encode(text), want, "prompt {text:?}");
        }
    }

    #[test]
    fn decode_round_trip() {
        let tok = ClipTokenizer::new();
        assert_eq!(
            tok.decode(&tok.encode("a photo of a cat")).trim(),
            "a photo of a cat"
        );
    }
}
