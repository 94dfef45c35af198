//! Generation: greedy decoding of worked answers, one problem or a batch at a time.

use ultramoe_model::Model;
use ultramoe_train::data::batch::prompt_tokens;
use ultramoe_train::data::math::{final_answer, to_model_digits};
use ultramoe_train::data::tokenizer::{decode, EOS};

/// Longest worked answer generated before giving up.
pub const MAX_ANSWER_TOKENS: usize = 96;

/// A solved problem.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Solution {
    /// the question as given
    pub question: String,
    /// worked answer, normal digit order
    pub worked: String,
    /// final answer
    pub answer: String,
    /// whether the model ended its answer (EOS) within the length limit
    pub complete: bool,
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy-decodes answers for several questions. Prompts of equal length share one
/// batched forward pass per generated token.
pub fn solve_batch(model: &Model, w: &[f32], questions: &[String]) -> Vec<Solution> {
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| prompt_tokens(q)).collect();
    let mut answers: Vec<Vec<u32>> = vec![vec![]; questions.len()];
    let mut done = vec![false; questions.len()];
    let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, p) in prompts.iter().enumerate() {
        by_len.entry(p.len()).or_default().push(i);
    }
    let max_t = model.cfg.max_position;
    for (len, group) in by_len {
        for chunk in group.chunks(64) {
            let mut seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let mut t = len;
            while t < max_t && t - len < MAX_ANSWER_TOKENS && chunk.iter().any(|&i| !done[i]) {
                let ids: Vec<u32> = seqs.iter().flatten().copied().collect();
                let fwd = model.forward(w, &ids, seqs.len(), t);
                let v = model.cfg.vocab_size;
                for (r, &i) in chunk.iter().enumerate() {
                    let tok = argmax(&fwd.logits[((r + 1) * t - 1) * v..(r + 1) * t * v]);
                    seqs[r].push(tok);
                    if !done[i] {
                        if tok == EOS {
                            done[i] = true;
                        } else {
                            answers[i].push(tok);
                        }
                    }
                }
                t += 1;
            }
        }
    }
    questions
        .iter()
        .zip(answers)
        .zip(done)
        .map(|((q, a), complete)| {
            let worked = to_model_digits(&decode(&a));
            Solution { question: q.clone(), answer: final_answer(&worked), worked, complete }
        })
        .collect()
}

/// Exact-match comparison of a produced and an expected answer (integers compared as
/// numbers, anything else as trimmed text; a leading `x=` is ignored).
pub fn answers_match(got: &str, expected: &str) -> bool {
    let clean = |s: &str| s.trim().trim_start_matches("x=").trim_start_matches("x =").trim().to_string();
    let (g, e) = (clean(got), clean(expected));
    match (g.parse::<i64>(), e.parse::<i64>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => g == e,
    }
}
