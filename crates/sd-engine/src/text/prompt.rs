//! AUTOMATIC1111 prompt syntax: attention weights, `BREAK`, and `<lora:…>` tags.
//!
//! [`parse_prompt_attention`] follows A1111's `modules/prompt_parser.py` semantics:
//! `(a)` multiplies by 1.1, `[a]` divides by 1.1, `(a:1.3)` multiplies by 1.3, brackets nest,
//! `\(` `\)` `\[` `\]` `\\` are literal characters (a lone `\` is dropped), unclosed brackets apply to
//! the rest of the prompt, unmatched closers are text, `BREAK` (as a whole word) becomes the entry
//! `("BREAK", -1.0)`, and neighbours with equal weights are merged. Weights are computed in f64 like
//! Python and rounded to f32 at the end (A1111 turns them into a float32 tensor).
//!
//! Differences, all in inputs where A1111 fails or is ill-defined: a weight that does not parse as a
//! number (e.g. `(a:1.2.3)`, where Python raises) is kept as plain text; only ASCII digits count
//! as weight digits.

/// Weight of the marker entry that forces a new 75-token chunk.
pub const BREAK_WEIGHT: f32 = -1.0;
/// Text of the marker entry that forces a new chunk.
pub const BREAK_TEXT: &str = "BREAK";

const ROUND_MULT: f64 = 1.1;
const SQUARE_MULT: f64 = 1.0 / 1.1;

/// A1111's `parse_prompt_attention`: the prompt as (text, weight) runs.
pub fn parse_prompt_attention(text: &str) -> Vec<(String, f32)> {
    parse_attention_f64(text)
        .into_iter()
        .map(|(t, w)| (t, w as f32))
        .collect()
}

/// Same as [`parse_prompt_attention`] with the f64 weights Python computes (used where A1111
/// compares weights exactly, e.g. `weight == -1` for BREAK).
pub(crate) fn parse_attention_f64(text: &str) -> Vec<(String, f64)> {
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();

    fn multiply(res: &mut [(String, f64)], from: usize, mult: f64) {
        for entry in &mut res[from..] {
            entry.1 *= mult;
        }
    }

    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let mut chars = rest.chars();
        let c = chars.next().unwrap_or_default();
        match c {
            '\\' => {
                // `\(` `\)` `\[` `\]` `\\` give the literal character; a lone backslash gives nothing.
                match chars.next() {
                    Some(n @ ('(' | ')' | '[' | ']' | '\\')) => {
                        res.push((n.to_string(), 1.0));
                        i += 2;
                    }
                    _ => {
                        res.push((String::new(), 1.0));
                        i += 1;
                    }
                }
            }
            '(' => {
                round.push(res.len());
                i += 1;
            }
            '[' => {
                square.push(res.len());
                i += 1;
            }
            ':' => match weight_token_len(rest) {
                Some(len) if !round.is_empty() => match weight_value(&rest[..len]) {
                    Some(weight) => {
                        if let Some(start) = round.pop() {
                            multiply(&mut res, start, weight);
                        }
                        i += len;
                    }
                    None => {
                        // Not a number (Python raises here): keep the `:` as text and go on,
                        // so the `)` still closes its bracket.
                        push_text(&mut res, ":");
                        i += 1;
                    }
                },
                Some(len) => {
                    // A weight with no open round bracket is plain text, `)` included.
                    push_text(&mut res, &rest[..len]);
                    i += len;
                }
                None => {
                    push_text(&mut res, ":");
                    i += 1;
                }
            },
            ')' => {
                match round.pop() {
                    Some(start) => multiply(&mut res, start, ROUND_MULT),
                    None => push_text(&mut res, ")"),
                }
                i += 1;
            }
            ']' => {
                match square.pop() {
                    Some(start) => multiply(&mut res, start, SQUARE_MULT),
                    None => push_text(&mut res, "]"),
                }
                i += 1;
            }
            _ => {
                let len = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                push_text(&mut res, &rest[..len]);
                i += len;
            }
        }
    }

    // Unclosed brackets apply to everything after them, round first, then square.
    for start in round {
        multiply(&mut res, start, ROUND_MULT);
    }
    for start in square {
        multiply(&mut res, start, SQUARE_MULT);
    }

    if res.is_empty() {
        res.push((String::new(), 1.0));
    }

    // Merge runs of identical weights.
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(res.len());
    for (t, w) in res {
        match merged.last_mut() {
            Some(last) if last.1 == w => last.0.push_str(&t),
            _ => merged.push((t, w)),
        }
    }
    merged
}

/// Length of a `:\s*[+-]?[.0-9]+\s*\)` token at the start of `s`, if there is one.
fn weight_token_len(s: &str) -> Option<usize> {
    let mut it = s.char_indices().peekable();
    if it.next().map(|(_, c)| c) != Some(':') {
        return None;
    }
    while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    it.next_if(|(_, c)| *c == '+' || *c == '-');
    let mut digits = 0;
    while it
        .next_if(|(_, c)| *c == '.' || c.is_ascii_digit())
        .is_some()
    {
        digits += 1;
    }
    if digits == 0 {
        return None;
    }
    while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    match it.next() {
        Some((pos, ')')) => Some(pos + 1),
        _ => None,
    }
}

/// Python `float()` of the number inside a weight token (`:<number>)`).
fn weight_value(token: &str) -> Option<f64> {
    let number = token.get(1..token.len() - 1)?.trim();
    // Python's float() accepts "1.", ".5", "+2"; Rust's parser agrees on these forms and, like
    // Python, rejects ".", "1.2.3", "+-1".
    number.parse().ok()
}

/// Appends plain text, splitting it at whole-word `BREAK`s (which swallow surrounding whitespace).
fn push_text(res: &mut Vec<(String, f64)>, text: &str) {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut part_start = 0;
    let mut search = 0;
    while let Some(rel) = text[search..].find(BREAK_TEXT) {
        let pos = search + rel;
        let end = pos + BREAK_TEXT.len();
        let before_ok = !text[..pos].chars().next_back().is_some_and(is_word);
        let after_ok = !text[end..].chars().next().is_some_and(is_word);
        if !(before_ok && after_ok) {
            search = pos + 1;
            continue;
        }
        // Whitespace right before the marker (not reaching back into the previous split).
        let lead = text[part_start..pos]
            .trim_end_matches(char::is_whitespace)
            .len()
            + part_start;
        let trail =
            end + (text[end..].len() - text[end..].trim_start_matches(char::is_whitespace).len());
        res.push((text[part_start..lead].to_string(), 1.0));
        res.push((BREAK_TEXT.to_string(), BREAK_WEIGHT as f64));
        part_start = trail;
        search = trail;
    }
    res.push((text[part_start..].to_string(), 1.0));
}

/// A `<lora:name:weight>` (or `<lyco:…>`) tag found in a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub weight: f32,
}

/// Removes A1111 extra-network tags (`<type:args>`, as `extra_networks.parse_prompt` does) from the
/// prompt and returns the cleaned prompt plus the `lora` / `lyco` tags in order of appearance.
///
/// `<lora:name>` has weight 1.0; `<lora:name:w>` has weight `w`; a later positional
/// (`<lora:name:te:unet>`) or named argument other than `te=` is ignored; `te=w` sets the weight.
/// A weight that is not a number falls back to 1.0. Tags of other types (e.g. `<hypernet:…>`) are
/// removed like A1111 does but not returned.
pub fn extract_lora_tags(prompt: &str) -> (String, Vec<LoraTag>) {
    let mut cleaned = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        match parse_extra_network(after) {
            Some((kind, args, len)) => {
                cleaned.push_str(&rest[..open]);
                if kind == "lora" || kind == "lyco" {
                    if let Some(tag) = lora_from_args(args) {
                        tags.push(tag);
                    }
                }
                rest = &after[len..];
            }
            None => {
                cleaned.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    cleaned.push_str(rest);
    (cleaned, tags)
}

/// Parses `type:args>` (the part after `<`): `\w+`, `:`, then one or more non-`>` characters, `>`.
/// Returns (type, args, length consumed including the `>`).
fn parse_extra_network(s: &str) -> Option<(&str, &str, usize)> {
    let kind_len = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    if kind_len == 0 || !s[kind_len..].starts_with(':') {
        return None;
    }
    let args_start = kind_len + 1;
    let close = s[args_start..].find('>')? + args_start;
    if close == args_start {
        return None;
    }
    Some((&s[..kind_len], &s[args_start..close], close + 1))
}

fn lora_from_args(args: &str) -> Option<LoraTag> {
    let mut positional = Vec::new();
    let mut te: Option<&str> = None;
    for item in args.split(':') {
        match item.split_once('=') {
            Some((key, value)) => {
                if key.trim() == "te" {
                    te = Some(value);
                }
            }
            None => positional.push(item),
        }
    }
    let name = positional.first()?.to_string();
    let weight_text = positional.get(1).copied().or(te);
    let weight = weight_text
        .and_then(|w| w.trim().parse::<f32>().ok())
        .unwrap_or(1.0);
    Some(LoraTag { name, weight })
}

/// Appends a LoRA's trained words to `prompt` with attention `weight`, as `prompt, (w1, w2:0.8)`
/// (no brackets at weight 1; `prompt` unchanged when there are no words or the weight is 0).
/// Brackets and backslashes inside the words are escaped so they stay literal text; blank and
/// repeated words are dropped.
pub fn add_trigger_words(prompt: &str, words: &[String], weight: f32) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for w in words {
        let w = w.trim();
        if !w.is_empty() && !seen.contains(&w) {
            seen.push(w);
        }
    }
    if seen.is_empty() || weight == 0.0 || !weight.is_finite() {
        return prompt.to_string();
    }
    let escaped: Vec<String> = seen
        .iter()
        .map(|w| {
            let mut out = String::with_capacity(w.len());
            for c in w.chars() {
                if matches!(c, '(' | ')' | '[' | ']' | '\\') {
                    out.push('\\');
                }
                out.push(c);
            }
            out
        })
        .collect();
    let joined = escaped.join(", ");
    let added = if weight == 1.0 {
        joined
    } else {
        format!("({joined}:{weight})")
    };
    let base = prompt.trim_end();
    if base.is_empty() {
        added
    } else if base.ends_with(',') {
        format!("{base} {added}")
    } else {
        format!("{base}, {added}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_words() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            add_trigger_words("a cat", &w(&["pixel art", "8bit"]), 0.8),
            "a cat, (pixel art, 8bit:0.8)"
        );
        assert_eq!(add_trigger_words("a cat, ", &w(&["x"]), 1.0), "a cat, x");
        assert_eq!(add_trigger_words("", &w(&["x", " x ", ""]), 1.5), "(x:1.5)");
        assert_eq!(add_trigger_words("a", &w(&[]), 0.8), "a");
        assert_eq!(add_trigger_words("a", &w(&["x"]), 0.0), "a");
        // Brackets in a trained word stay literal and the weight applies to all of it.
        let p = add_trigger_words("a", &w(&["b (c)"]), 1.2);
        assert_eq!(p, "a, (b \\(c\\):1.2)");
        let runs = parse_prompt_attention(&p);
        assert_eq!(
            runs,
            vec![("a, ".to_string(), 1.0), ("b (c)".to_string(), 1.2)]
        );
    }

    fn p(text: &str) -> Vec<(String, f64)> {
        parse_attention_f64(text)
    }

    fn v(items: &[(&str, f64)]) -> Vec<(String, f64)> {
        items.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    #[test]
    fn a1111_documented_examples() {
        assert_eq!(p("normal text"), v(&[("normal text", 1.0)]));
        assert_eq!(
            p("an (important) word"),
            v(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(p("(unbalanced"), v(&[("unbalanced", 1.1)]));
        assert_eq!(p("\\(literal\\]"), v(&[("(literal]", 1.0)]));
        assert_eq!(p("(unnecessary)(parens)"), v(&[("unnecessaryparens", 1.1)]));
        assert_eq!(
            p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            v(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn weights_escapes_and_edge_cases() {
        assert_eq!(p(""), v(&[("", 1.0)]));
        assert_eq!(p("[a]"), v(&[("a", 1.0 / 1.1)]));
        assert_eq!(p("(a: 1.5 )"), v(&[("a", 1.5)]));
        assert_eq!(p("(a:-0.5)"), v(&[("a", -0.5)]));
        assert_eq!(p("(a:.5)"), v(&[("a", 0.5)]));
        // A weight with no open round bracket is plain text.
        assert_eq!(p("a:1.2)"), v(&[("a:1.2)", 1.0)]));
        assert_eq!(p("a) b]"), v(&[("a) b]", 1.0)]));
        assert_eq!(p("\\\\x\\y"), v(&[("\\xy", 1.0)]));
        assert_eq!(p("time: 12:00"), v(&[("time: 12:00", 1.0)]));
        // Unparseable weight (Python would raise): kept as text, brackets still apply.
        assert_eq!(p("(a:1.2.3)"), v(&[("a:1.2.3", 1.1)]));
        // Unclosed square and round brackets.
        assert_eq!(
            p("[a (b"),
            v(&[("a ", SQUARE_MULT), ("b", 1.1 * SQUARE_MULT)])
        );
        // Square inside round.
        assert_eq!(p("([a])"), v(&[("a", SQUARE_MULT * 1.1)]));
    }

    #[test]
    fn break_handling() {
        assert_eq!(
            p("a BREAK b"),
            v(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        assert_eq!(
            p("a\n BREAK\tb"),
            v(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        assert_eq!(p("BREAK"), v(&[("", 1.0), ("BREAK", -1.0), ("", 1.0)]));
        assert_eq!(
            p("aBREAK b BREAKs BREAK_"),
            v(&[("aBREAK b BREAKs BREAK_", 1.0)])
        );
        assert_eq!(
            p("a,BREAK,b"),
            v(&[("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)])
        );
        assert_eq!(
            p("a BREAK BREAK b"),
            v(&[
                ("a", 1.0),
                ("BREAK", -1.0),
                ("", 1.0),
                ("BREAK", -1.0),
                ("b", 1.0)
            ])
        );
        // Inside brackets the marker is multiplied too (and so is no longer a marker, as in A1111).
        let r = p("(a BREAK b)");
        assert_eq!(r[1].0, "BREAK");
        assert!((r[1].1 + 1.1).abs() < 1e-12);
        // (x, weight) pairs with f32 weights.
        assert_eq!(
            parse_prompt_attention("x BREAK (y)"),
            vec![
                ("x".into(), 1.0),
                ("BREAK".into(), BREAK_WEIGHT),
                ("".into(), 1.0),
                ("y".into(), 1.1f32)
            ]
        );
    }

    #[test]
    fn matches_a1111_on_fuzzed_prompts() {
        // Generated by tools/fixtures/make_text_rng_fixtures.py with a re-implementation of A1111's
        // parser that was checked against A1111's own code on 3 300 prompts.
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/text/a1111_chunks.json"))
                .expect("json");
        let cases = fixture["parse"].as_array().expect("parse cases");
        assert!(cases.len() >= 200);
        for case in cases {
            let prompt = case["prompt"].as_str().expect("prompt");
            let want: Vec<(String, f64)> = case["runs"]
                .as_array()
                .expect("runs")
                .iter()
                .map(|r| {
                    let text = r[0].as_str().expect("text").to_string();
                    let weight: f64 = r[1].as_str().expect("weight").parse().expect("f64");
                    (text, weight)
                })
                .collect();
            assert_eq!(p(prompt), want, "prompt {prompt:?}");
        }
    }

    #[test]
    fn lora_tags() {
        let (clean, tags) =
            extract_lora_tags("a cat, <lora:film grain:0.8> <lyco:styleX> <lora:y:te=0.3>");
        assert_eq!(clean, "a cat,   ");
        assert_eq!(
            tags,
            vec![
                LoraTag {
                    name: "film grain".into(),
                    weight: 0.8
                },
                LoraTag {
                    name: "styleX".into(),
                    weight: 1.0
                },
                LoraTag {
                    name: "y".into(),
                    weight: 0.3
                },
            ]
        );
        let (clean, tags) = extract_lora_tags("<hypernet:h:1>x <lora:> <notatag> a<b <lora:z:bad>");
        assert_eq!(clean, "x <lora:> <notatag> a<b ");
        assert_eq!(
            tags,
            vec![LoraTag {
                name: "z".into(),
                weight: 1.0
            }]
        );
        let (clean, tags) = extract_lora_tags("plain (prompt:1.2)");
        assert_eq!(clean, "plain (prompt:1.2)");
        assert!(tags.is_empty());
        let (_, tags) = extract_lora_tags("<lora:n:0.5:0.7>");
        assert_eq!(
            tags,
            vec![LoraTag {
                name: "n".into(),
                weight: 0.5
            }]
        );
    }
}
