//! Tensor-train shapes: parsing, validation, balanced factorization and the shape planners.
//!
//! Two TT layouts are used in this crate, both over the row-major reshape of a Burn-layout
//! weight `W` of shape `[d_in, d_out]`:
//! - **flat** (LoRETTA): any shape with `Π n_k = d_in · d_out`; the row/column boundary may cut
//!   through a mode (e.g. `[16,16,8,4,4]` for a 4096×8 factor).
//! - **split** (TT-LoRA): `tt_shape = input_factors ++ reversed(output_factors)`, i.e. a prefix of
//!   the shape multiplies to exactly `d_in`; then `rank(ΔW) ≤ r` at that cut.

use crate::error::{AdapterError, Result};

/// Largest number of cores accepted anywhere (keeps planners and parsers bounded).
pub const MAX_CORES: usize = 32;

/// Largest dimension the factorizer accepts (2^40; trial division stays fast below it).
pub const MAX_DIM: usize = 1 << 40;

/// Parses a shape such as `16,16,16` (also `16x16x16`) into its factors.
///
/// Every factor must be a positive integer; the shape must not be empty.
pub fn parse_shape(input: &str) -> Result<Vec<usize>> {
    let err = |reason: &str| AdapterError::ShapeParse { input: input.to_string(), reason: reason.to_string() };
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(err("expected comma-separated positive integers, e.g. 16,16,16"));
    }
    let mut shape = Vec::new();
    for part in trimmed.split([',', 'x']) {
        let part = part.trim();
        let value: usize = part.parse().map_err(|_| err(&format!("`{part}` is not a positive integer")))?;
        if value == 0 {
            return Err(err("factors must be at least 1"));
        }
        shape.push(value);
        if shape.len() > MAX_CORES {
            return Err(err(&format!("more than {MAX_CORES} factors")));
        }
    }
    Ok(shape)
}

/// Product of the factors, or `None` on overflow.
pub fn checked_product(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n))
}

pub(crate) fn shape_error(shape: &[usize], rows: usize, cols: usize, reason: impl Into<String>) -> AdapterError {
    AdapterError::InvalidTtShape { shape: shape.to_vec(), rows, cols, reason: reason.into() }
}

/// Checks a flat (LoRETTA) TT shape for a `rows × cols` matrix.
pub fn validate_flat_shape(shape: &[usize], rows: usize, cols: usize) -> Result<()> {
    if shape.is_empty() {
        return Err(shape_error(shape, rows, cols, "the shape is empty"));
    }
    if shape.len() > MAX_CORES {
        return Err(shape_error(shape, rows, cols, format!("more than {MAX_CORES} cores")));
    }
    if shape.contains(&0) {
        return Err(shape_error(shape, rows, cols, "factors must be at least 1"));
    }
    let target = rows.checked_mul(cols);
    match (checked_product(shape), target) {
        (Some(p), Some(t)) if p == t => Ok(()),
        (p, t) => Err(shape_error(
            shape,
            rows,
            cols,
            format!(
                "the factors multiply to {}, expected {} = {rows}·{cols}",
                p.map_or("an overflowing number".to_string(), |p| p.to_string()),
                t.map_or("an overflowing number".to_string(), |t| t.to_string()),
            ),
        )),
    }
}

/// Checks a split (TT-LoRA) shape and returns the number of input cores `p`
/// (the first `p` factors multiply to `d_in`, the rest to `d_out`).
pub fn validate_split_shape(shape: &[usize], d_in: usize, d_out: usize) -> Result<usize> {
    validate_flat_shape(shape, d_in, d_out)?;
    if shape.len() < 2 {
        return Err(shape_error(shape, d_in, d_out, "needs at least one input and one output factor"));
    }
    let mut prefix = 1usize;
    for (k, &n) in shape.iter().enumerate().take(shape.len() - 1) {
        prefix *= n; // cannot overflow: bounded by the full product checked above
        if prefix == d_in {
            return Ok(k + 1);
        }
        if prefix > d_in {
            break;
        }
    }
    Err(shape_error(
        shape,
        d_in,
        d_out,
        format!(
            "no leading factors multiply to d_in = {d_in}; a TT-LoRA shape is input_factors ++ reversed(output_factors)"
        ),
    ))
}

/// Prime factors of `n` in ascending order (`[]` for 1).
fn prime_factors(mut n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut p = 2usize;
    while p.saturating_mul(p) <= n {
        while n.is_multiple_of(p) {
            out.push(p);
            n /= p;
        }
        p += 1;
    }
    if n > 1 {
        out.push(n);
    }
    out
}

/// Splits `dim` into `n_cores` factors, each at least 2, as balanced as possible
/// (smallest variance of the log-factors), sorted in descending order.
///
/// `factorize(4096, 3) == [16, 16, 16]`, `factorize(768, 2) == [32, 24]`.
/// Errors when `dim` has fewer than `n_cores` prime factors, or on zero arguments.
pub fn factorize(dim: usize, n_cores: usize) -> Result<Vec<usize>> {
    if dim == 0 || dim > MAX_DIM {
        return Err(crate::error::invalid("dim", dim, format!("must be between 1 and {MAX_DIM}")));
    }
    if n_cores == 0 || n_cores > MAX_CORES {
        return Err(crate::error::invalid("n_cores", n_cores, format!("must be between 1 and {MAX_CORES}")));
    }
    if n_cores == 1 {
        return Ok(vec![dim]);
    }
    let primes = prime_factors(dim);
    if primes.len() < n_cores {
        return Err(crate::error::invalid(
            "n_cores",
            n_cores,
            format!("{dim} has only {} prime factors, so it cannot be split into {n_cores} factors ≥ 2", primes.len()),
        ));
    }
    let mean = (dim as f64).ln() / n_cores as f64;
    let divisors = divisors_descending(dim);
    let mut best: Option<(f64, Vec<usize>)> = None;
    let mut current = Vec::with_capacity(n_cores);
    search_factors(&divisors, dim, n_cores, dim, mean, &mut current, &mut best);
    Ok(best.expect("a split exists when there are enough prime factors").1)
}

/// All divisors of `n`, largest first.
fn divisors_descending(n: usize) -> Vec<usize> {
    let mut divisors = vec![1usize];
    let primes = prime_factors(n);
    let mut i = 0;
    while i < primes.len() {
        let p = primes[i];
        let count = primes[i..].iter().take_while(|&&q| q == p).count();
        let existing = divisors.clone();
        let mut power = 1usize;
        for _ in 0..count {
            power *= p;
            divisors.extend(existing.iter().map(|d| d * power));
        }
        i += count;
    }
    divisors.sort_unstable_by(|a, b| b.cmp(a));
    divisors
}

/// Depth-first search over non-increasing factor sequences built from the divisors of `dim`.
fn search_factors(
    divisors: &[usize],
    remaining: usize,
    left: usize,
    max_factor: usize,
    mean: f64,
    current: &mut Vec<usize>,
    best: &mut Option<(f64, Vec<usize>)>,
) {
    if left == 1 {
        if remaining >= 2 && remaining <= max_factor {
            current.push(remaining);
            let score: f64 = current.iter().map(|&f| ((f as f64).ln() - mean).powi(2)).sum();
            if best.as_ref().is_none_or(|(s, _)| score < *s - 1e-12) {
                *best = Some((score, current.clone()));
            }
            current.pop();
        }
        return;
    }
    for &d in divisors {
        if d > max_factor || d > remaining / 2 || !remaining.is_multiple_of(d) {
            continue;
        }
        // Non-increasing order: the largest of `left` factors is at least their geometric mean.
        if (d as f64).powi(left as i32) < remaining as f64 * (1.0 - 1e-9) {
            break;
        }
        let rest = remaining / d;
        if d >= 2 && prime_factors(rest).len() >= left - 1 {
            current.push(d);
            search_factors(divisors, rest, left - 1, d, mean, current, best);
            current.pop();
        }
    }
}

/// Number of cores for one side of a matrix: factors near 16 (as in the published shapes),
/// at least one, never more than `dim` has prime factors.
fn cores_for(dim: usize, target_factor: f64) -> usize {
    let by_size = ((dim as f64).ln() / target_factor.ln()).round() as usize;
    by_size.clamp(1, prime_factors(dim).len().max(1))
}

/// Orders factors so that the largest sit at both ends of the train.
///
/// End cores have a boundary rank of 1, so large outer factors cost the fewest parameters
/// and make the first and last contraction steps the cheap ones.
pub fn outer_large(mut factors: Vec<usize>) -> Vec<usize> {
    factors.sort_unstable_by(|a, b| b.cmp(a));
    let mut left = Vec::with_capacity(factors.len());
    let mut right = Vec::new();
    for (i, f) in factors.into_iter().enumerate() {
        if i % 2 == 0 { left.push(f) } else { right.push(f) }
    }
    left.extend(right.into_iter().rev());
    left
}

/// Plans a TT-LoRA shape for a `d_in × d_out` matrix:
/// `input_factors ++ reversed(output_factors)` with balanced factors near 16, the largest factors
/// outermost. `plan_tt_lora_shape(4096, 4096) == [16, 16, 16, 16, 16, 16]`.
pub fn plan_tt_lora_shape(d_in: usize, d_out: usize) -> Result<Vec<usize>> {
    crate::error::require_positive("d_in", d_in)?;
    crate::error::require_positive("d_out", d_out)?;
    let input = factorize(d_in, cores_for(d_in, 16.0))?; // descending: largest first
    let mut output = factorize(d_out, cores_for(d_out, 16.0))?;
    output.reverse(); // reversed(output_factors): largest last
    Ok(input.into_iter().chain(output).collect())
}

/// Plans a flat TT shape for a `rows × cols` matrix (LoRETTA layout): balanced factors near 8,
/// the largest outermost.
pub fn plan_flat_shape(rows: usize, cols: usize) -> Result<Vec<usize>> {
    crate::error::require_positive("rows", rows)?;
    crate::error::require_positive("cols", cols)?;
    let total = rows
        .checked_mul(cols)
        .ok_or_else(|| crate::error::invalid("rows·cols", format!("{rows}·{cols}"), "overflows"))?;
    let n = cores_for(total, 8.0).max(if prime_factors(total).len() >= 2 { 2 } else { 1 });
    Ok(outer_large(factorize(total, n)?))
}

/// LoRETTA's published shapes (`TRANSFORMERS_HIDDEN_SIZE_TO_TENSOR_SHAPE` in the official code):
/// TT shape of a `hidden × rank` factor for LoRA rank (or bottleneck) `rank` and hidden size `hidden`.
///
/// Entries whose product is not `hidden·rank` are skipped (the planner is used instead): the
/// official rank-32 row repeats the rank-16 shapes for 1024, 1280, 1536, 1600, 4096, 5120 and 8192,
/// and the rank-64 entry for 2304 multiplies to 2304·128.
pub fn loretta_published_shape(hidden: usize, rank: usize) -> Option<&'static [usize]> {
    loretta_table_entry(hidden, rank).filter(|s| checked_product(s) == hidden.checked_mul(rank))
}

/// `(hidden, [(rank, shape)])` rows of LoRETTA's published shape table.
type ShapeTable = &'static [(usize, &'static [(usize, &'static [usize])])];

/// The official table entry verbatim, valid or not.
pub fn loretta_table_entry(hidden: usize, rank: usize) -> Option<&'static [usize]> {
    const TABLE: ShapeTable = &[
        (
            5,
            &[
                (768, &[5, 8, 12, 8]),
                (1024, &[4, 8, 5, 8, 4]),
                (1280, &[4, 8, 5, 8, 5]),
                (1536, &[4, 8, 5, 8, 6]),
                (1600, &[5, 8, 5, 8, 5]),
                (2304, &[5, 8, 8, 4, 9]),
                (4096, &[16, 16, 5, 4, 4]),
                (5120, &[5, 8, 10, 8, 8]),
                (8192, &[4, 16, 16, 10, 4]),
            ],
        ),
        (
            8,
            &[
                (768, &[8, 8, 12, 8]),
                (1024, &[4, 8, 8, 8, 4]),
                (1280, &[4, 8, 8, 8, 5]),
                (1536, &[4, 8, 8, 8, 6]),
                (1600, &[5, 8, 8, 8, 5]),
                (2304, &[8, 8, 8, 4, 9]),
                (4096, &[16, 16, 8, 4, 4]),
                (5120, &[8, 8, 10, 8, 8]),
                (8192, &[4, 16, 16, 16, 4]),
            ],
        ),
        (
            16,
            &[
                (768, &[8, 16, 12, 8]),
                (1024, &[4, 8, 16, 8, 4]),
                (1280, &[4, 8, 16, 8, 5]),
                (1536, &[4, 8, 16, 8, 6]),
                (1600, &[5, 8, 16, 8, 5]),
                (2304, &[8, 8, 8, 8, 9]),
                (4096, &[16, 16, 16, 4, 4]),
                (5120, &[8, 16, 10, 8, 8]),
                (8192, &[4, 16, 16, 16, 8]),
            ],
        ),
        (
            32,
            &[
                (768, &[4, 8, 12, 8, 8]),
                (1024, &[4, 8, 16, 8, 4]),
                (1280, &[4, 8, 16, 8, 5]),
                (1536, &[4, 8, 16, 8, 6]),
                (1600, &[5, 8, 16, 8, 5]),
                (2304, &[8, 8, 16, 8, 9]),
                (4096, &[16, 16, 16, 4, 4]),
                (5120, &[8, 16, 10, 8, 8]),
                (8192, &[4, 16, 16, 16, 8]),
            ],
        ),
        (
            64,
            &[
                (768, &[8, 8, 12, 8, 8]),
                (1024, &[4, 8, 8, 8, 8, 4]),
                (1280, &[4, 8, 8, 8, 8, 5]),
                (1536, &[4, 8, 8, 8, 8, 6]),
                (1600, &[5, 8, 8, 8, 8, 5]),
                (2304, &[8, 8, 8, 8, 8, 9]),
                (4096, &[16, 16, 16, 4, 4, 4]),
                (5120, &[5, 8, 8, 16, 8, 8]),
                (8192, &[4, 16, 16, 16, 8, 4]),
            ],
        ),
        (
            128,
            &[
                (768, &[8, 16, 12, 8, 8]),
                (1024, &[4, 8, 16, 8, 8, 4]),
                (1280, &[4, 8, 16, 8, 8, 5]),
                (1536, &[4, 8, 16, 8, 8, 6]),
                (1600, &[5, 8, 16, 8, 8, 5]),
                (4096, &[16, 16, 16, 8, 4, 4]),
                (5120, &[5, 8, 16, 16, 8, 8]),
                (8192, &[4, 16, 16, 16, 16, 4]),
            ],
        ),
    ];
    TABLE.iter().find(|(r, _)| *r == rank).and_then(|(_, row)| row.iter().find(|(h, _)| *h == hidden)).map(|(_, s)| *s)
}

/// Every (rank, hidden) pair in the published LoRETTA table, for tests and documentation.
pub fn loretta_published_keys() -> Vec<(usize, usize)> {
    let mut keys = Vec::new();
    for rank in [5, 8, 16, 32, 64, 128] {
        for hidden in [768, 1024, 1280, 1536, 1600, 2304, 4096, 5120, 8192] {
            if loretta_table_entry(hidden, rank).is_some() {
                keys.push((rank, hidden));
            }
        }
    }
    keys
}

/// Shape of a `hidden × rank` LoRETTA factor: the published shape when there is one, else planned.
pub fn loretta_factor_shape(hidden: usize, rank: usize) -> Result<Vec<usize>> {
    match loretta_published_shape(hidden, rank) {
        Some(s) => Ok(s.to_vec()),
        None => plan_flat_shape(hidden, rank),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorize_is_balanced_and_descending() {
        assert_eq!(factorize(4096, 3).unwrap(), vec![16, 16, 16]);
        assert_eq!(factorize(4096, 6).unwrap(), vec![4, 4, 4, 4, 4, 4]);
        assert_eq!(factorize(768, 2).unwrap(), vec![32, 24]);
        assert_eq!(factorize(11008, 3).unwrap().iter().product::<usize>(), 11008);
        assert!(factorize(7, 2).is_err());
        assert!(factorize(0, 2).is_err());
        assert!(factorize(16, 0).is_err());
    }

    #[test]
    fn split_planner_and_validation() {
        assert_eq!(plan_tt_lora_shape(4096, 4096).unwrap(), vec![16; 6]);
        assert_eq!(plan_tt_lora_shape(2048, 2048).unwrap(), vec![16, 16, 8, 8, 16, 16]);
        for (i, o) in [(768, 768), (4096, 1024), (384, 1536), (5, 7), (1, 9)] {
            let s = plan_tt_lora_shape(i, o).unwrap();
            assert_eq!(validate_split_shape(&s, i, o).map(|p| checked_product(&s[..p])), Ok(Some(i)));
        }
        assert!(validate_split_shape(&[12, 8, 8, 3, 8, 8, 12], 768, 2304).is_ok());
        assert!(validate_split_shape(&[16, 16, 16], 4096, 1).is_err()); // no output factor
        assert!(validate_split_shape(&[10, 10], 4, 25).is_err()); // no prefix = 4
        assert!(validate_flat_shape(&[], 4, 4).is_err());
        assert!(validate_flat_shape(&[4, 0, 4], 4, 4).is_err());
        assert!(validate_flat_shape(&[usize::MAX, 3], 4, 4).is_err());
    }

    #[test]
    fn parse_rejects_garbage() {
        assert_eq!(parse_shape("16, 16,16").unwrap(), vec![16, 16, 16]);
        assert_eq!(parse_shape("4x8").unwrap(), vec![4, 8]);
        for bad in ["", "  ", "16,,16", "a,b", "16,-1", "0,4", "1.5"] {
            assert!(parse_shape(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn published_loretta_shapes_multiply_out() {
        let mut broken = Vec::new();
        for (rank, hidden) in loretta_published_keys() {
            let s = loretta_table_entry(hidden, rank).unwrap();
            if s.iter().product::<usize>() != hidden * rank {
                broken.push((rank, hidden));
                assert_eq!(loretta_published_shape(hidden, rank), None);
                assert_eq!(loretta_factor_shape(hidden, rank).unwrap().iter().product::<usize>(), hidden * rank);
            }
        }
        assert_eq!(loretta_published_keys().len(), 53);
        // The official rank-32 row copies the rank-16 shapes for these sizes, plus one rank-64 slip.
        let mut expected: Vec<_> = [1024, 1280, 1536, 1600, 4096, 5120, 8192].iter().map(|&h| (32, h)).collect();
        expected.push((64, 2304)); // [8,8,8,8,8,9] multiplies to 2304·128

        assert_eq!(broken, expected);
        let planned = plan_flat_shape(2048, 8).unwrap();
        assert_eq!(planned.iter().product::<usize>(), 2048 * 8);
    }
}
