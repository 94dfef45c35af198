//! Text for generation: the model's tokenizer (see [`ultramoe_train::data::text`]) and
//! the streaming of generated text as it becomes final.

pub use ultramoe_train::data::text::*;

/// Turns a growing list of generated tokens into text pieces as they become final: the
/// text of all tokens so far is decoded and what extends the text already sent is sent,
/// held back while it ends in an incomplete character (a byte-level token may carry
/// half of one) or could still become a stop sequence.
pub struct TextStream {
    ids: Vec<u32>,
    sent: usize,
    stops: Vec<String>,
}

/// What a token added to the stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Piece {
    /// text to send now
    pub text: String,
    /// a stop sequence appeared: the generation is over, its text not sent
    pub stopped: bool,
}

impl TextStream {
    /// A stream that ends at any of `stops` (empty strings ignored).
    pub fn new(stops: Vec<String>) -> Self {
        TextStream { ids: vec![], sent: 0, stops: stops.into_iter().filter(|s| !s.is_empty()).collect() }
    }

    /// Adds a token; returns the text that became final.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Piece {
        self.ids.push(id);
        let text = tok.decode(&self.ids);
        if let Some(at) = self.stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            let piece = text.get(self.sent..at).unwrap_or("").to_string();
            self.sent = at.max(self.sent);
            return Piece { text: piece, stopped: true };
        }
        if text.ends_with('\u{FFFD}') || !text.is_char_boundary(self.sent.min(text.len())) || text.len() < self.sent {
            return Piece { text: String::new(), stopped: false };
        }
        // Hold back a tail that is the start of some stop sequence.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k])).max())
            .max()
            .unwrap_or(0)
            .max(tok.unsettled_tail(&text));
        let end = text.len() - hold;
        if end <= self.sent || !text.is_char_boundary(end) {
            return Piece { text: String::new(), stopped: false };
        }
        let piece = text[self.sent..end].to_string();
        self.sent = end;
        Piece { text: piece, stopped: false }
    }

    /// Whatever was held back, at the end of the generation.
    pub fn finish(&mut self, tok: &TextTokenizer) -> String {
        let text = tok.decode(&self.ids);
        let piece = text.get(self.sent..).unwrap_or("").to_string();
        self.sent = text.len();
        piece
    }
}

