//! A character tokenizer fit for arithmetic: one token per printable ASCII character (so
//! every digit is its own token and numbers never merge into opaque pieces), plus four
//! specials. Input text is normalised first (see [`normalize_question`]).

/// Padding (never trained on).
pub const PAD: u32 = 0;
/// Start of an example.
pub const BOS: u32 = 1;
/// End of an answer.
pub const EOS: u32 = 2;
/// Separates the question from the worked answer.
pub const SEP: u32 = 3;
const FIRST_CHAR: u32 = 4;
/// Vocabulary size: 4 specials + 95 printable ASCII characters, rounded up to 128.
pub const VOCAB_SIZE: usize = 128;

/// Encodes text (printable ASCII; other characters become `?`).
pub fn encode(text: &str) -> Vec<u32> {
    text.chars()
        .map(|c| {
            let c = if (' '..='~').contains(&c) { c } else { '?' };
            FIRST_CHAR + (c as u32 - ' ' as u32)
        })
        .collect()
}

/// Decodes tokens, skipping specials.
pub fn decode(ids: &[u32]) -> String {
    ids.iter()
        .filter(|&&t| (FIRST_CHAR..FIRST_CHAR + 95).contains(&t))
        .map(|&t| char::from_u32(t - FIRST_CHAR + ' ' as u32).unwrap_or('?'))
        .collect()
}

/// Normalises a problem the way a person might type it into one canonical form:
/// `×`, `·` and a lone `x`/`X` between two numbers become `*`, `−`/`–` become `-`, a
/// leading "What is"/"Compute"/"Calculate" and a trailing `?`/`=` are dropped, and
/// "Solve for x:" is dropped (an `x` beside `=` already says it is an equation). Pure
/// expressions and equations lose their spaces; word problems keep single spaces and
/// are lowercased.
pub fn normalize_question(q: &str) -> String {
    let mut s: String = q
        .trim()
        .chars()
        .map(|c| match c {
            '×' | '·' | '∙' => '*',
            '−' | '–' | '—' => '-',
            '÷' => '/',
            c => c,
        })
        .collect();
    let lower = s.to_lowercase();
    for prefix in ["what is", "what's", "compute", "calculate", "evaluate", "solve for x:", "solve for x", "solve:", "solve"] {
        if lower.starts_with(prefix) {
            s = s[prefix.len()..].trim().to_string();
            break;
        }
    }
    let s = s.trim().trim_end_matches(['?', '.']).trim().to_string();
    let s = s.strip_suffix('=').map(|x| x.trim().to_string()).unwrap_or(s);
    let is_formula = s.chars().all(|c| c.is_ascii_digit() || " +-*/()=xX".contains(c));
    if is_formula {
        let chars: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).collect();
        let mut out = String::new();
        for (i, &c) in chars.iter().enumerate() {
            if c == 'x' || c == 'X' {
                let prev = i.checked_sub(1).map(|j| chars[j]);
                let next = chars.get(i + 1).copied();
                let times = matches!(prev, Some(p) if p.is_ascii_digit() || p == ')')
                    && matches!(next, Some(n) if n.is_ascii_digit() || n == '(');
                out.push(if times { '*' } else { 'x' });
            } else {
                out.push(c);
            }
        }
        out
    } else {
        s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_normalisation() {
        assert_eq!(decode(&encode("58*73=4234")), "58*73=4234");
        assert_eq!(normalize_question("347 + 589"), "347+589");
        assert_eq!(normalize_question("What is 12 + 7?"), "12+7");
        assert_eq!(normalize_question("58 × 73"), "58*73");
        assert_eq!(normalize_question("58 x 73"), "58*73");
        assert_eq!(normalize_question("58X73 ="), "58*73");
        assert_eq!(normalize_question("Solve for x: -4x + 9 = -31"), "-4x+9=-31");
        assert_eq!(normalize_question("Tom has 3 apples.  He buys 4 more. How many?"), "tom has 3 apples. he buys 4 more. how many");
        assert!(encode("a").iter().all(|&t| (t as usize) < VOCAB_SIZE));
    }
}
