//! Solving math problems: greedy, KV-cached decoding of worked answers, many at a time.

use ultramoe_model::decode::{pick_inputs, LogitRows};
use ultramoe_model::decode_weights::DecodeWeights;
use ultramoe_model::kv_cache::SeqCache;
use ultramoe_model::Model;
use ultramoe_serve::sampling::argmax;
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

/// Greedy-decodes answers for several questions, 64 at a time in one batch of cached
/// passes: the prompts in the first pass, then one token per unfinished question.
pub fn solve_batch(model: &Model, w: &DecodeWeights, questions: &[String]) -> Vec<Solution> {
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| prompt_tokens(q)).collect();
    let mut answers: Vec<Vec<u32>> = vec![vec![]; questions.len()];
    let mut done = vec![false; questions.len()];
    let max_t = model.cfg.max_position;
    for chunk in (0..questions.len()).collect::<Vec<_>>().chunks(64) {
        let mut caches: Vec<SeqCache> = chunk.iter().map(|_| SeqCache::new(model)).collect();
        let mut next: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let mut live: Vec<usize> = (0..chunk.len()).filter(|&r| !next[r].is_empty() && next[r].len() < max_t).collect();
        while !live.is_empty() {
            let logits = {
                let mut inputs = pick_inputs(&mut caches, live.iter().map(|&r| (r, &next[r][..])), |c| c);
                model.forward_cached(w, &mut inputs, LogitRows::Last)
            };
            let mut still = vec![];
            for (&r, z) in live.iter().zip(logits) {
                let i = chunk[r];
                let tok = argmax(&z);
                if tok == EOS {
                    done[i] = true;
                    continue;
                }
                answers[i].push(tok);
                next[r] = vec![tok];
                if answers[i].len() < MAX_ANSWER_TOKENS && caches[r].len + 1 < max_t {
                    still.push(r);
                }
            }
            live = still;
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
