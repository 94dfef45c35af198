//! One canonical text for every way a problem may be typed, so the model sees
//! `523-178` whether the user typed `523 - 178`, `What is 523 minus 178?` or
//! `523 − 178 =`, and `d/dx(x^2sin(x))` for `Differentiate x² sin(x)`.
//!
//! Canonical forms (no spaces):
//! - arithmetic, linear and quadratic equations: the formula (`(16+29)*(14-8)`,
//!   `-4x+9=-31`, `x^2-5x+6=0`); a lone `x` between numbers is a product;
//! - systems: `2x+y=7,x-y=2`;
//! - derivatives: `d/dx(F)`; indefinite integrals: `int(F)dx`; definite integrals:
//!   `int[a,b](F)dx` — `F` with `exp(u)` written `e^(u)`;
//! - word problems: lowercased, single spaces.

/// Normalises a problem as typed into its canonical form (see the module docs).
pub fn normalize_question(q: &str) -> String {
    let mut s = String::new();
    for c in q.trim().chars() {
        match c {
            '×' | '·' | '∙' => s.push('*'),
            '−' | '–' | '—' => s.push('-'),
            '÷' => s.push('/'),
            '²' => s.push_str("^2"),
            '³' => s.push_str("^3"),
            '∫' => s.push_str(" int "),
            c => s.extend(c.to_lowercase()),
        }
    }
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let s = s.trim_end_matches(['?', '.', '!']).trim().to_string();
    calculus_form(&s).or_else(|| system_form(&s)).unwrap_or_else(|| formula_form(&s))
}

/// Text without spaces, `exp(…)` as `e^(…)` and `**` as `^`.
fn compact(s: &str) -> String {
    let c: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    c.replace("**", "^").replace("exp(x)", "e^x").replace("exp(", "e^(")
}

/// `s` without parentheses that wrap all of it.
fn unwrap_parens(s: &str) -> &str {
    let t = s.trim();
    if t.starts_with('(') && t.ends_with(')') {
        // the first `(` must close at the very end
        let mut depth = 0;
        for (i, c) in t.char_indices() {
            depth += match c {
                '(' => 1,
                ')' => -1,
                _ => 0,
            };
            if depth == 0 {
                return if i == t.len() - 1 { unwrap_parens(&t[1..t.len() - 1]) } else { t };
            }
        }
    }
    t
}

fn strip_any<'a>(s: &'a str, prefixes: &[&str]) -> Option<&'a str> {
    prefixes.iter().find_map(|p| s.strip_prefix(p)).map(str::trim)
}

/// Derivatives and integrals.
fn calculus_form(s: &str) -> Option<String> {
    let derivative = strip_any(s, &["d/dx", "differentiate", "what is the derivative of", "find the derivative of", "the derivative of", "derivative of"])
        .map(|f| f.trim_end_matches("with respect to x").trim())
        .or_else(|| {
            let rest = strip_any(s, &["find f'(x) if f(x) =", "find f'(x) given f(x) =", "if f(x) =", "f(x) ="])?;
            Some(rest.trim_end_matches("find f'(x)").trim().trim_end_matches(',').trim())
        });
    if let Some(f) = derivative {
        return Some(format!("d/dx({})", compact(unwrap_parens(f))));
    }
    let integral = strip_any(s, &["evaluate the integral of", "what is the integral of", "find the integral of", "the integral of", "find the antiderivative of", "integrate", "int "])?;
    // ∫_a^b f dx
    if let Some(rest) = integral.strip_prefix('_') {
        let (lo, rest) = rest.split_once('^')?;
        let (hi, f) = rest.trim_start().split_once(|c: char| c.is_whitespace() || c == '(')?;
        let f = if rest.trim_start().as_bytes().get(hi.len()) == Some(&b'(') { &rest.trim_start()[hi.len()..] } else { f };
        return Some(definite(lo, hi, f));
    }
    // ∫ from a to b of f dx
    if let Some(rest) = integral.strip_prefix("from ") {
        let (lo, rest) = rest.split_once(" to ")?;
        let (hi, f) = rest.split_once(" of ")?;
        return Some(definite(lo, hi, f));
    }
    let f = integral.trim_end_matches("dx").trim();
    // f from a to b
    if let Some((f, limits)) = f.rsplit_once(" from ") {
        let (lo, hi) = limits.split_once(" to ")?;
        return Some(definite(lo, hi, f));
    }
    Some(format!("int({})dx", compact(unwrap_parens(f))))
}

/// `int[lo,hi](f)dx`.
fn definite(lo: &str, hi: &str, f: &str) -> String {
    format!("int[{},{}]({})dx", compact(lo), compact(hi), compact(unwrap_parens(f.trim().trim_end_matches("dx").trim())))
}

/// Two equations: `E1, E2`, `E1 and E2`, `E1; E2` after "solve", "solve the system",
/// "find x and y if".
fn system_form(s: &str) -> Option<String> {
    let body = strip_any(s, &["solve the system of equations", "solve the system", "find x and y if", "find x and y:", "solve:", "solve"]).unwrap_or(s);
    let (a, b) = body.split_once(',').or_else(|| body.split_once(" and ")).or_else(|| body.split_once(';'))?;
    let (a, b) = (compact(a), compact(b));
    let is_eq = |e: &str| e.matches('=').count() == 1 && e.chars().all(|c| c.is_ascii_digit() || "+-*=xy".contains(c));
    (is_eq(&a) && is_eq(&b) && (a.contains('y') || b.contains('y'))).then(|| format!("{a},{b}"))
}

/// Arithmetic and equations in one unknown: prefixes dropped, words as symbols,
/// spaces removed; anything else (word problems) lowercased with single spaces.
fn formula_form(s: &str) -> String {
    let mut s = s.to_string();
    for prefix in ["what is", "what's", "compute", "calculate", "evaluate", "solve for x:", "solve for x", "solve:", "solve", "find the roots of", "what are the solutions of", "what are the roots of"] {
        if let Some(rest) = s.strip_prefix(prefix) {
            let roots = prefix.contains("roots");
            s = rest.trim().to_string();
            if roots && !s.contains('=') {
                s.push_str("=0");
            }
            break;
        }
    }
    for (word, sym) in [(" plus ", "+"), (" minus ", "-"), (" times ", "*"), (" multiplied by ", "*"), (" divided by ", "/")] {
        s = s.replace(word, sym);
    }
    let s = s.trim().trim_end_matches('=').trim().to_string();
    let is_formula = s.chars().all(|c| c.is_ascii_digit() || " +-*/()=x^".contains(c));
    if !is_formula {
        return s;
    }
    let chars: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c == 'x' {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1).copied();
            let times = matches!(prev, Some(p) if p.is_ascii_digit() || p == ')') && matches!(next, Some(n) if n.is_ascii_digit() || n == '(');
            out.push(if times { '*' } else { 'x' });
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::normalize_question as n;

    #[test]
    fn arithmetic_spellings_share_one_form() {
        assert_eq!(n("347 + 589"), "347+589");
        assert_eq!(n("What is 12 + 7?"), "12+7");
        assert_eq!(n("58 × 73"), "58*73");
        assert_eq!(n("58 x 73"), "58*73");
        assert_eq!(n("58X73 ="), "58*73");
        assert_eq!(n("What is 523 minus 178?"), "523-178");
        assert_eq!(n("Calculate 12 multiplied by 7"), "12*7");
        assert_eq!(n("847 ÷ 7"), "847/7");
        assert_eq!(n("What is 100 divided by 7?"), "100/7");
        assert_eq!(n("15 - (-8)"), "15-(-8)");
        assert_eq!(n("Solve for x: -4x + 9 = -31"), "-4x+9=-31");
        assert_eq!(n("Tom has 3 apples.  He buys 4 more. How many?"), "tom has 3 apples. he buys 4 more. how many");
    }

    #[test]
    fn higher_math_spellings_share_one_form() {
        for q in ["d/dx (3x^4 - 2x^2 + 7x - 5)", "Differentiate 3x^4 - 2x^2 + 7x - 5", "What is the derivative of 3x^4 - 2x^2 + 7x - 5?", "Find f'(x) if f(x) = 3x^4 - 2x^2 + 7x - 5", "d/dx 3x⁴ - 2x² + 7x - 5".replace('⁴', "^4").as_str()] {
            assert_eq!(n(q), "d/dx(3x^4-2x^2+7x-5)", "{q}");
        }
        assert_eq!(n("Differentiate x^2 sin(x)"), "d/dx(x^2sin(x))");
        assert_eq!(n("Differentiate exp(3x + 1)"), "d/dx(e^(3x+1))");
        for q in ["Integrate 6x^2 + 4x dx", "∫ (6x^2 + 4x) dx", "What is the integral of 6x^2 + 4x?", "Find the antiderivative of 6x^2 + 4x", "∫ 6x² + 4x dx"] {
            assert_eq!(n(q), "int(6x^2+4x)dx", "{q}");
        }
        for q in ["Evaluate the integral of 3x^2 from 1 to 2", "Integrate 3x^2 from 1 to 2", "∫_1^2 (3x^2) dx", "∫_1^2 3x^2 dx", "What is the integral of 3x^2 from 1 to 2?", "∫ from 1 to 2 of 3x^2 dx"] {
            assert_eq!(n(q), "int[1,2](3x^2)dx", "{q}");
        }
        assert_eq!(n("∫_-2^3 (x - 1) dx"), "int[-2,3](x-1)dx");
        for q in ["Solve x^2 - 5x + 6 = 0", "x^2 - 5x + 6 = 0", "Find the roots of x^2 - 5x + 6", "What are the solutions of x² - 5x + 6 = 0?"] {
            assert_eq!(n(q), "x^2-5x+6=0", "{q}");
        }
        for q in ["Solve: 2x + y = 7, x - y = 2", "Solve the system 2x + y = 7 and x - y = 2", "Find x and y if 2x + y = 7 and x - y = 2", "2x + y = 7; x - y = 2"] {
            assert_eq!(n(q), "2x+y=7,x-y=2", "{q}");
        }
    }
}
