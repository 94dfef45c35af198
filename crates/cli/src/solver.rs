//! Solving math problems: greedy, KV-cached decoding of worked answers, many at a time.

use ultramoe_model::decode::{pick_inputs, LogitRows};
use ultramoe_model::decode_weights::DecodeWeights;
use ultramoe_model::kv_cache::SeqCache;
use ultramoe_model::Model;
use ultramoe_serve::sampling::{argmax, Sampler, SamplingParams};
use ultramoe_train::data::math::check::verify;
use ultramoe_train::data::batch::prompt_tokens;
use ultramoe_train::data::math::{final_answer, to_model_digits};
pub use ultramoe_train::data::math::grade::answers_match;
use ultramoe_train::data::tokenizer::{decode, EOS};

/// Longest worked answer generated before giving up (the longest trained worked
/// answers, definite integrals, are about 200 tokens).
pub const MAX_ANSWER_TOKENS: usize = 240;

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
    decode_batch(model, w, questions, &mut |_, z| argmax(z))
}

/// Like [`solve_batch`], sampling each token at `temperature` instead (question `i`
/// with its own generator, seeded by `seed` and `i`).
pub fn sample_batch(model: &Model, w: &DecodeWeights, questions: &[String], temperature: f32, seed: u64) -> Vec<Solution> {
    let mut samplers: Vec<Sampler> = (0..questions.len())
        .map(|i| Sampler::new(SamplingParams { temperature, seed: Some(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)), ..Default::default() }))
        .collect();
    decode_batch(model, w, questions, &mut |i, z| samplers[i].sample(z, &[]))
}

/// A solution after checking (see `math::check`): how many answers were drawn, and
/// whether the kept one passed the check (`None`: the kind has no check).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Checked {
    /// the kept solution
    #[serde(flatten)]
    pub solution: Solution,
    /// answers drawn (1: the greedy one was kept)
    pub attempts: usize,
    /// whether the kept answer passed its check
    pub verified: Option<bool>,
}

/// Greedy answers, then for each whose check fails up to `retries` sampled answers
/// (temperature 0.7), keeping the first that passes (else the greedy one).
pub fn solve_checked(model: &Model, w: &DecodeWeights, questions: &[String], retries: usize) -> Vec<Checked> {
    check_and_resample(model, w, solve_batch(model, w, questions), retries)
}

/// [`solve_checked`] from greedy answers already decoded.
pub fn check_and_resample(model: &Model, w: &DecodeWeights, greedy: Vec<Solution>, retries: usize) -> Vec<Checked> {
    let mut out: Vec<Checked> = greedy
        .into_iter()
        .map(|s| {
            let verified = verify(&s.question, &s.answer);
            Checked { solution: s, attempts: 1, verified }
        })
        .collect();
    for round in 0..retries {
        let failing: Vec<usize> = (0..out.len()).filter(|&i| out[i].verified == Some(false)).collect();
        if failing.is_empty() {
            break;
        }
        let qs: Vec<String> = failing.iter().map(|&i| out[i].solution.question.clone()).collect();
        for (&i, s) in failing.iter().zip(sample_batch(model, w, &qs, 0.7, round as u64 + 1)) {
            out[i].attempts += 1;
            if verify(&s.question, &s.answer) == Some(true) {
                out[i].solution = s;
                out[i].verified = Some(true);
            }
        }
    }
    out
}

fn decode_batch(model: &Model, w: &DecodeWeights, questions: &[String], pick: &mut dyn FnMut(usize, &mut [f32]) -> u32) -> Vec<Solution> {
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
                let mut z = z;
                let tok = pick(i, &mut z);
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
