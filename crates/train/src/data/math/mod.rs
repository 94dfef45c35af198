//! Math problems with worked answers.
//!
//! Kinds: arithmetic (sums, differences, products, divisions with remainders, expressions
//! of 2–4 operations with parentheses), linear equations, word problems, derivatives
//! (polynomials, products with sin/cos/exp, the chain rule), integrals of polynomials
//! (indefinite and definite), quadratic equations and systems of two linear equations.
//! Every problem comes with a worked answer written by [`steps::Steps`]: steps the model
//! writes one after another, each small enough to do in one go, and the final answer in
//! the notation a person writes.
//!
//! The model reads and writes the worked answer with every digit run reversed
//! (least-significant digit first, see [`to_model_digits`]): then each output digit of an
//! addition or a partial product depends only on digits already seen and one carry,
//! which a small model learns quickly. The reversal is a fixed, invertible encoding of
//! the answer text, undone before anything is shown.

pub mod algebra;
pub mod arith;
pub mod calculus;
pub mod check;
pub mod grade;
pub mod normalize;
pub mod notation;
pub mod scope;
pub mod steps;

use steps::Steps;
use ultramoe_model::init::Rng;

/// What kind of problem, for sampling mixes and per-kind accuracy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `a + b`, 1–3 digit operands, sometimes negative
    Add,
    /// `a - b`, 1–3 digit operands, sometimes negative
    Sub,
    /// `a × b`, 1–3 digits by 1–3 digits
    Mul,
    /// `a ÷ b` by 2–12, exact or with a remainder
    Div,
    /// 2–4 operations, parentheses and precedence
    Expr,
    /// `ax + b = c`
    Equation,
    /// a sentence around one operation
    Word,
    /// derivative of a polynomial of degree ≤ 5
    Derivative,
    /// derivative of `a·x^n` times sin, cos or exp (product rule)
    Product,
    /// derivative of `k·f(ax + b)` for sin, cos, exp (chain rule)
    Chain,
    /// indefinite integral of a polynomial
    Integral,
    /// definite integral of a polynomial between integer limits
    Definite,
    /// `ax² + bx + c = 0` with integer roots
    Quadratic,
    /// two linear equations in `x`, `y`
    System,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 14] = [
        Kind::Add,
        Kind::Sub,
        Kind::Mul,
        Kind::Div,
        Kind::Expr,
        Kind::Equation,
        Kind::Word,
        Kind::Derivative,
        Kind::Product,
        Kind::Chain,
        Kind::Integral,
        Kind::Definite,
        Kind::Quadratic,
        Kind::System,
    ];
    /// Short name used on the command line and in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Add => "add",
            Kind::Sub => "sub",
            Kind::Mul => "mul",
            Kind::Div => "div",
            Kind::Expr => "expr",
            Kind::Equation => "equation",
            Kind::Word => "word",
            Kind::Derivative => "derivative",
            Kind::Product => "product",
            Kind::Chain => "chain",
            Kind::Integral => "integral",
            Kind::Definite => "definite",
            Kind::Quadratic => "quadratic",
            Kind::System => "system",
        }
    }
    /// Parses [`Kind::name`].
    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.name() == s)
    }
    /// An example question of this kind, for help texts and tables.
    pub fn example(&self) -> &'static str {
        match self {
            Kind::Add => "347 + 589",
            Kind::Sub => "What is 523 minus 178?",
            Kind::Mul => "472 × 97",
            Kind::Div => "847 ÷ 7",
            Kind::Expr => "(16 + 29) * (14 - 8)",
            Kind::Equation => "Solve for x: -4x + 9 = -31",
            Kind::Word => "Ana had 340 cards and gave away 125. How many cards are left?",
            Kind::Derivative => "d/dx (3x^4 - 2x^2 + 7x - 5)",
            Kind::Product => "Differentiate x^2 sin(x)",
            Kind::Chain => "Differentiate cos(3x + 1)",
            Kind::Integral => "Integrate 6x^2 + 4x dx",
            Kind::Definite => "Evaluate the integral of 3x^2 from 1 to 2",
            Kind::Quadratic => "Solve x^2 - 5x + 6 = 0",
            Kind::System => "Solve: 2x + y = 7, x - y = 2",
        }
    }
}

/// A problem as a person types it, its worked answer (normal digit order) and the final
/// answer.
#[derive(Clone, Debug)]
pub struct Problem {
    /// kind
    pub kind: Kind,
    /// question text
    pub question: String,
    /// worked answer, steps separated by `;`
    pub worked: String,
    /// final answer
    pub answer: String,
}

impl Problem {
    /// A problem from its steps; `answer` when the final answer is not simply what the
    /// last step computes (it is then written after `|`).
    pub fn new(kind: Kind, question: String, steps: Steps, answer: Option<String>) -> Problem {
        let worked = steps.finish_with(answer.as_deref());
        let answer = final_answer(&worked);
        Problem { kind, question, worked, answer }
    }
}

/// Reverses every maximal run of digits: `58*70=4060` ↔ `85*07=0604`. Its own inverse.
pub fn to_model_digits(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut run = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            out.extend(run.chars().rev());
            run.clear();
            out.push(c);
        }
    }
    out.extend(run.chars().rev());
    out
}

/// The final answer of a worked answer: the text after the last `|` when there is one,
/// else the text after the last `=` of the last step.
pub fn final_answer(worked: &str) -> String {
    if let Some((_, a)) = worked.rsplit_once('|') {
        return a.trim().to_string();
    }
    let last = worked.rsplit(';').next().unwrap_or("");
    last.rsplit('=').next().unwrap_or("").trim().to_string()
}

/// A number in `lo..=hi` other than zero.
pub(crate) fn nonzero(rng: &mut Rng, lo: i64, hi: i64) -> i64 {
    loop {
        let v = rng.range(lo, hi);
        if v != 0 {
            return v;
        }
    }
}

pub(crate) fn pick<'a>(rng: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.range(0, xs.len() as i64 - 1) as usize]
}

/// Which side of the train/test split a problem is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// problems training may see
    Train,
    /// held out: evaluation only
    Test,
}

/// Every problem belongs to exactly one split, decided by a hash of its normalised
/// text (one in ten is held out), so "unseen" is literal: training never draws a test
/// problem in any surface form that normalises the same way.
pub fn split_of(question: &str) -> Split {
    let norm = crate::data::tokenizer::normalize_question(question);
    // FNV-1a
    let h = norm.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    if h % 10 == 0 {
        Split::Test
    } else {
        Split::Train
    }
}

/// Samples one problem of `kind` from `split`.
pub fn generate_in(rng: &mut Rng, kind: Kind, split: Split) -> Problem {
    loop {
        let p = generate(rng, kind);
        if split_of(&p.question) == split {
            return p;
        }
    }
}

/// Samples one problem of `kind`, from either split.
pub fn generate(rng: &mut Rng, kind: Kind) -> Problem {
    match kind {
        Kind::Add | Kind::Sub => arith::add_sub(rng, kind),
        Kind::Mul => arith::mul(rng),
        Kind::Div => arith::div(rng),
        Kind::Expr => arith::expr(rng),
        Kind::Equation => algebra::linear(rng),
        Kind::Word => arith::word(rng),
        Kind::Derivative => calculus::derivative_polynomial(rng),
        Kind::Product => calculus::derivative_product(rng),
        Kind::Chain => calculus::derivative_chain(rng),
        Kind::Integral => calculus::integral_indefinite(rng),
        Kind::Definite => calculus::integral_definite(rng),
        Kind::Quadratic => algebra::quadratic(rng),
        Kind::System => algebra::system(rng),
    }
}

/// The file in a saved model's directory naming the kinds of problems it was trained on,
/// written when training drew only some (`--data math:…`); without it, every kind.
pub const TRAINED_KINDS_FILE: &str = "math_kinds.json";

/// Writes `dir/`[`TRAINED_KINDS_FILE`]: `{"kinds": ["add", …]}`.
pub fn write_trained_kinds(dir: &std::path::Path, names: &[String]) -> std::io::Result<()> {
    let kinds: Vec<&str> = names.iter().filter_map(|n| Kind::from_name(mix_entry(n).0)).map(|k| k.name()).collect();
    std::fs::write(dir.join(TRAINED_KINDS_FILE), serde_json::json!({ "kinds": kinds }).to_string())
}

/// The kinds the model in `dir` was trained on: `None` when it names none (trained on
/// every kind); an error names the file and what is wrong in it.
pub fn trained_kinds(dir: &std::path::Path) -> Result<Option<Vec<Kind>>, String> {
    let path = dir.join(TRAINED_KINDS_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let bad = |why: &str| format!("{}: {why}", path.display());
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&format!("not JSON ({e})")))?;
    let names = v.get("kinds").and_then(|k| k.as_array()).ok_or_else(|| bad("field `kinds`: expected a list of kind names"))?;
    names
        .iter()
        .map(|n| n.as_str().and_then(Kind::from_name).ok_or_else(|| bad(&format!("field `kinds`: `{n}` is not a kind"))))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// One `kind` or `kind=weight` entry of `--data math:…`: the kind's name and its
/// weight's text, trimmed.
fn mix_entry(e: &str) -> (&str, Option<&str>) {
    match e.split_once('=') {
        Some((n, w)) => (n.trim(), Some(w.trim())),
        None => (e.trim(), None),
    }
}

/// A weighted mix of kinds to sample from.
#[derive(Clone, Debug)]
pub struct Mix(pub Vec<(Kind, f64)>);

impl Default for Mix {
    /// The training mix: more weight on the kinds a first run of the demo got wrong
    /// most (expressions, systems, definite integrals, signed sums and equations),
    /// less on those it learned first (derivatives, integrals, word problems).
    fn default() -> Self {
        Mix(vec![
            (Kind::Add, 0.08),
            (Kind::Sub, 0.10),
            (Kind::Mul, 0.11),
            (Kind::Div, 0.07),
            (Kind::Expr, 0.16),
            (Kind::Equation, 0.09),
            (Kind::Word, 0.02),
            (Kind::Derivative, 0.04),
            (Kind::Product, 0.02),
            (Kind::Chain, 0.02),
            (Kind::Integral, 0.03),
            (Kind::Definite, 0.09),
            (Kind::Quadratic, 0.05),
            (Kind::System, 0.12),
        ])
    }
}

impl Mix {
    /// The default mix restricted to the named kinds (their weights kept, so their
    /// proportions among themselves are the default's), or at the weights given as
    /// `kind=weight` (relative: `add=2,sub=1` draws additions twice as often).
    pub fn only(entries: &[String]) -> Result<Mix, String> {
        let known = || Kind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ");
        let defaults = Mix::default().0;
        let mut mix: Vec<(Kind, f64)> = Vec::new();
        for e in entries {
            let (name, weight) = mix_entry(e);
            let k = Kind::from_name(name).ok_or_else(|| format!("data: unknown math kind `{name}` (known: {})", known()))?;
            let w = match weight {
                Some(w) => w.parse::<f64>().ok().filter(|w| w.is_finite() && *w > 0.0).ok_or_else(|| format!("data: the weight `{w}` of `{name}` is not a positive number"))?,
                None => defaults.iter().find(|(d, _)| *d == k).map(|(_, w)| *w).expect("every kind has a default weight"),
            };
            if !mix.iter().any(|(m, _)| *m == k) {
                mix.push((k, w));
            }
        }
        if mix.is_empty() {
            return Err(format!("data: no math kinds named (known: {})", known()));
        }
        // Kinds in the default mix's order, so the same kinds draw the same stream however they were listed.
        mix.sort_by_key(|(k, _)| defaults.iter().position(|(d, _)| d == k));
        Ok(Mix(mix))
    }

    /// Samples a kind.
    pub fn sample(&self, rng: &mut Rng) -> Kind {
        let total: f64 = self.0.iter().map(|(_, w)| w).sum();
        let mut u = rng.uniform() * total;
        for (k, w) in &self.0 {
            if u < *w {
                return *k;
            }
            u -= w;
        }
        self.0.last().expect("mix is not empty").0
    }
}

#[cfg(test)]
mod tests;
