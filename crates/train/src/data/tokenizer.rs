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

pub use super::math::normalize::normalize_question;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_normalisation() {
        assert_eq!(decode(&encode("58*73=4234")), "58*73=4234");
        assert!(encode("a").iter().all(|&t| (t as usize) < VOCAB_SIZE));
    }
}
