//! User problems from JSON Lines: one `{"question": ..., "answer": ...}` object a line
//! (`answer` a string or a number; blank lines skipped).

use std::path::Path;

/// One user problem.
#[derive(Clone, Debug)]
pub struct QaPair {
    /// question text
    pub question: String,
    /// expected final answer
    pub answer: String,
    /// line in the file (1-based; 0 when not read from a file)
    pub line: usize,
}

/// Reads a JSONL file; errors name the file, line and field.
pub fn read_jsonl(path: &Path) -> Result<Vec<QaPair>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = |what: String| format!("{}: line {}: {what}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
        let q = v.get("question").and_then(|x| x.as_str()).ok_or_else(|| at("`question`: missing or not a string".into()))?;
        let a = match v.get("answer") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err(at("`answer`: missing or not a string/number".into())),
        };
        out.push(QaPair { question: q.to_string(), answer: a.trim().to_string(), line: i + 1 });
    }
    if out.is_empty() {
        return Err(format!("{}: empty: no problems found", path.display()));
    }
    Ok(out)
}
