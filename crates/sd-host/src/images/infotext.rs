//! AUTOMATIC1111 "infotext": the generation-parameters text A1111 writes into its images, and its parser.
//!
//! Layout (what A1111's readers expect):
//! ```text
//! <prompt, possibly several lines>
//! Negative prompt: <negative prompt, possibly several lines>      (only when non-empty)
//! Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...
//! ```
//! Keys come in A1111's order; a value containing `,`, `:` or a newline is written as a JSON string.

use serde_json::{Map, Value};

/// Written as the `Version` key, so readers can tell which build made an image.
pub fn version_string() -> String {
    format!("sd-host v{}", env!("CARGO_PKG_VERSION"))
}

/// A1111's value quoting: JSON-quoted (non-ASCII kept) only when the value would break the `k: v, ` list.
pub fn quote(v: &str) -> String {
    if v.contains(',') || v.contains(':') || v.contains('\n') {
        // Serialising a &str cannot fail.
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// The reverse of [`quote`]: a `"..."` value is decoded as JSON; anything else is kept as it is.
pub fn unquote(v: &str) -> String {
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(v) {
            return s;
        }
    }
    v.to_string()
}

/// Our schedule names → A1111's "Schedule type" labels (`None` = the sampler's default = Automatic).
pub fn schedule_type_label(schedule: Option<&str>) -> String {
    match schedule.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("automatic") => "Automatic".into(),
        Some("normal") => "Normal".into(),
        Some("karras") => "Karras".into(),
        Some("exponential") => "Exponential".into(),
        Some("uniform") => "Uniform".into(),
        Some("sgm_uniform") => "SGM Uniform".into(),
        Some(other) => {
            let mut c = other.chars();
            match c.next() {
                Some(f) => f.to_uppercase().chain(c).collect(),
                None => "Automatic".into(),
            }
        }
    }
}

/// A1111's label → our schedule name (`None` for Automatic or unknown).
pub fn schedule_type_from_label(label: &str) -> Option<&'static str> {
    match label.trim().to_ascii_lowercase().as_str() {
        "normal" => Some("normal"),
        "karras" => Some("karras"),
        "exponential" => Some("exponential"),
        _ => None,
    }
}

/// Numbers as A1111 shows them: integral values without a fraction (`7`), others shortest (`7.5`).
fn num(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(i.to_string())
            } else if let Some(u) = n.as_u64() {
                Some(u.to_string())
            } else {
                n.as_f64().filter(|f| f.is_finite()).map(|f| f.to_string())
            }
        }
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn text<'a>(p: &'a Value, key: &str) -> &'a str {
    p.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A1111 infotext for one image from a `TaskParams`-shaped JSON object (its `seed` is the image's seed).
pub fn infotext(params: &Value) -> String {
    let mut kv: Vec<(&str, String)> = Vec::new();
    if let Some(steps) = params.get("num_inference_steps").and_then(num) {
        kv.push(("Steps", steps));
    }
    // Older A1111 names carried the schedule ("DPM++ 2M Karras"); 1.9+ splits it into two keys.
    let mut sampler = text(params, "scheduler").to_string();
    let mut schedule = params
        .get("schedule_type")
        .and_then(Value::as_str)
        .map(str::to_string);
    for (suffix, name) in [(" Karras", "karras"), (" Exponential", "exponential")] {
        if schedule.is_none() {
            if let Some(base) = sampler.strip_suffix(suffix) {
                sampler = base.to_string();
                schedule = Some(name.to_string());
            }
        }
    }
    if !sampler.is_empty() {
        kv.push(("Sampler", sampler));
        kv.push(("Schedule type", schedule_type_label(schedule.as_deref())));
    }
    if let Some(cfg) = params.get("guidance_scale").and_then(num) {
        kv.push(("CFG scale", cfg));
    }
    if let Some(seed) = params.get("seed").and_then(num) {
        kv.push(("Seed", seed));
    }
    if let (Some(w), Some(h)) = (
        params.get("width").and_then(num),
        params.get("height").and_then(num),
    ) {
        kv.push(("Size", format!("{w}x{h}")));
    }
    let model = text(params, "model");
    if model.len() >= 10 {
        kv.push(("Model hash", model[..10].to_ascii_lowercase()));
    }
    let model_name = text(params, "model_name");
    if !model_name.is_empty() {
        kv.push(("Model", model_name.to_string()));
    }
    if let Some(vae) = params.get("vae").filter(|v| v.is_object()) {
        let sha = text(vae, "sha256");
        if sha.len() >= 10 {
            kv.push(("VAE hash", sha[..10].to_ascii_lowercase()));
        }
        let name = text(vae, "name");
        if !name.is_empty() {
            kv.push(("VAE", name.to_string()));
        }
    }
    if let Some(strength) = params.get("strength").and_then(num) {
        kv.push(("Denoising strength", strength));
    }
    if let Some(cs) = params.get("clip_skip").and_then(Value::as_u64) {
        if cs > 1 {
            kv.push(("Clip skip", cs.to_string()));
        }
    }
    // Our noise reproduces PyTorch's CPU generator, which A1111 records as "RNG: CPU".
    kv.push(("RNG", "CPU".into()));
    let lora_hashes: Vec<String> = params
        .get("loras")
        .and_then(Value::as_array)
        .map(|loras| {
            loras
                .iter()
                .filter_map(|l| {
                    let name = l.get("name")?.as_str()?.replace([':', ','], "");
                    let sha = l.get("sha256")?.as_str()?;
                    (sha.len() >= 12 && !name.is_empty())
                        .then(|| format!("{name}: {}", sha[..12].to_ascii_lowercase()))
                })
                .collect()
        })
        .unwrap_or_default();
    if !lora_hashes.is_empty() {
        kv.push(("Lora hashes", lora_hashes.join(", ")));
    }
    kv.push(("Version", version_string()));

    let params_line = kv
        .iter()
        .map(|(k, v)| {
            if *k == v.as_str() {
                k.to_string()
            } else {
                format!("{k}: {}", quote(v))
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let prompt = text(params, "prompt");
    let negative = text(params, "negative_prompt");
    let negative_line = if negative.is_empty() {
        String::new()
    } else {
        format!("\nNegative prompt: {negative}")
    };
    format!("{prompt}{negative_line}\n{params_line}")
        .trim()
        .to_string()
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The `key: value` pairs of one line, matched the way A1111's `re_param` does (values unquoted later).
fn param_pairs(line: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = line.chars().collect();
    let n = chars.len();
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        match match_pair(&chars, start) {
            Some((k, v, end)) => {
                out.push((k, v));
                // An empty match cannot happen (a key is at least 2 chars), so this always advances.
                start = end;
            }
            None => start += 1,
        }
    }
    out
}

/// One `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)` match at `i`: (key, raw value, end).
fn match_pair(c: &[char], mut i: usize) -> Option<(String, String, usize)> {
    let n = c.len();
    while i < n && c[i].is_whitespace() {
        i += 1;
    }
    if i >= n || !is_word(c[i]) {
        return None;
    }
    let key_start = i;
    i += 1;
    while i < n && (is_word(c[i]) || matches!(c[i], ' ' | '-' | '/')) {
        i += 1;
    }
    // The key class holds no ':', so backtracking could never find one earlier: the run must end at ':'.
    if i - key_start < 2 || i >= n || c[i] != ':' {
        return None;
    }
    let key: String = c[key_start..i].iter().collect();
    i += 1;
    while i < n && c[i].is_whitespace() {
        i += 1;
    }
    if i < n && c[i] == '"' {
        let mut j = i + 1;
        let mut body = 0;
        while j < n && c[j] != '"' {
            if c[j] == '\\' {
                if j + 1 >= n {
                    break;
                }
                j += 2;
            } else {
                j += 1;
            }
            body += 1;
        }
        if j < n && c[j] == '"' && body > 0 && (j + 1 == n || c[j + 1] == ',') {
            let v: String = c[i..=j].iter().collect();
            let end = if j + 1 < n { j + 2 } else { j + 1 };
            return Some((key, v, end));
        }
    }
    let mut j = i;
    while j < n && c[j] != ',' {
        j += 1;
    }
    let v: String = c[i..j].iter().collect();
    let end = if j < n { j + 1 } else { j };
    Some((key, v, end))
}

/// A1111's parse of an infotext: `prompt`, `negative_prompt`, and every `key: value` pair of the last line
/// as strings (quoted values decoded). `Size`-like `WxH` values are also split into `Key-1`/`Key-2`.
pub fn parse_infotext(text: &str) -> Map<String, Value> {
    let mut res = Map::new();
    let trimmed = text.trim();
    let mut lines: Vec<&str> = trimmed.split('\n').collect();
    let mut last = lines.pop().unwrap_or("");
    if param_pairs(last).len() < 3 {
        lines.push(last);
        last = "";
    }
    let mut prompt = String::new();
    let mut negative = String::new();
    let mut in_negative = false;
    for line in lines {
        let mut line = line.trim();
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            line = rest.trim();
        }
        let target = if in_negative {
            &mut negative
        } else {
            &mut prompt
        };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }
    res.insert("prompt".into(), Value::String(prompt));
    res.insert("negative_prompt".into(), Value::String(negative));
    for (k, v) in param_pairs(last) {
        let v = unquote(v.trim_end());
        if let Some((w, h)) = v.split_once('x') {
            if !w.is_empty()
                && !h.is_empty()
                && w.bytes().all(|b| b.is_ascii_digit())
                && h.bytes().all(|b| b.is_ascii_digit())
            {
                res.insert(format!("{k}-1"), Value::String(w.to_string()));
                res.insert(format!("{k}-2"), Value::String(h.to_string()));
            }
        }
        res.insert(k, Value::String(v));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "prompt": "a cat, sitting",
            "negative_prompt": "blurry",
            "model": "0123456789abcdef".repeat(4),
            "model_name": "tiny",
            "family": "sd1",
            "width": 512, "height": 768,
            "num_inference_steps": 20,
            "guidance_scale": 7.0,
            "strength": null,
            "scheduler": "DPM++ 2M",
            "schedule_type": "karras",
            "seed": 1234,
            "loras": [],
            "clip_skip": 1,
            "metadata": {}
        })
    }

    #[test]
    fn txt2img_infotext_is_exact() {
        let t = infotext(&base());
        assert_eq!(
            t,
            format!(
                "a cat, sitting\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, \
                 CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 0123456789, Model: tiny, RNG: CPU, \
                 Version: {}",
                version_string()
            )
        );
    }

    #[test]
    fn img2img_infotext_has_denoising_lora_hashes_and_quoting() {
        let mut p = base();
        p["strength"] = json!(0.75);
        p["negative_prompt"] = json!("");
        p["guidance_scale"] = json!(7.5);
        p["clip_skip"] = json!(2);
        p["schedule_type"] = Value::Null;
        p["scheduler"] = json!("Euler a");
        p["model_name"] = json!("my: model, v2");
        p["loras"] = json!([
            {"sha256": "abcdef0123456789".repeat(4), "name": "detail:er", "weight": 0.8},
            {"sha256": "fedcba9876543210".repeat(4), "name": "style", "weight": 1.0}
        ]);
        let t = infotext(&p);
        assert_eq!(
            t,
            format!(
                "a cat, sitting\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, \
                 Seed: 1234, Size: 512x768, Model hash: 0123456789, Model: \"my: model, v2\", \
                 Denoising strength: 0.75, Clip skip: 2, RNG: CPU, \
                 Lora hashes: \"detailer: abcdef012345, style: fedcba987654\", Version: {}",
                version_string()
            )
        );
        let parsed = parse_infotext(&t);
        assert_eq!(parsed["prompt"], "a cat, sitting");
        assert_eq!(parsed["negative_prompt"], "");
        assert_eq!(parsed["Model"], "my: model, v2");
        assert_eq!(
            parsed["Lora hashes"],
            "detailer: abcdef012345, style: fedcba987654"
        );
        assert_eq!(parsed["Denoising strength"], "0.75");
        assert_eq!(parsed["Size-1"], "512");
        assert_eq!(parsed["Size-2"], "768");
    }

    #[test]
    fn parse_round_trips_multiline_prompts() {
        let mut p = base();
        p["prompt"] = json!("line one\nline two: with colon");
        p["negative_prompt"] = json!("bad\nworse");
        let parsed = parse_infotext(&infotext(&p));
        assert_eq!(parsed["prompt"], "line one\nline two: with colon");
        assert_eq!(parsed["negative_prompt"], "bad\nworse");
        assert_eq!(parsed["Steps"], "20");
        assert_eq!(parsed["Sampler"], "DPM++ 2M");
        assert_eq!(parsed["Schedule type"], "Karras");
        assert_eq!(parsed["CFG scale"], "7");
        assert_eq!(parsed["Seed"], "1234");
        assert_eq!(parsed["Model hash"], "0123456789");
    }

    #[test]
    fn parse_of_prompt_only_text() {
        let parsed = parse_infotext("just a prompt");
        assert_eq!(parsed["prompt"], "just a prompt");
        assert_eq!(parsed.len(), 2);
    }

    #[test]
    fn legacy_sampler_names_are_split() {
        let mut p = base();
        p["scheduler"] = json!("DPM++ 2M Karras");
        p["schedule_type"] = Value::Null;
        let t = infotext(&p);
        assert!(
            t.contains("Sampler: DPM++ 2M, Schedule type: Karras,"),
            "{t}"
        );
    }
}
