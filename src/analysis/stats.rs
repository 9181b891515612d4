//! Small statistics: for the change-rate analysis of METHODS.md §3.5 step 8, summaries and the
//! Welch t-test between instruction-verb and general-verb change rates, matching
//! `scipy.stats.ttest_ind(a, b, equal_var=False)`. The Student-t CDF goes through the
//! regularised incomplete beta function (continued fraction, modified Lentz). For knowledge
//! consistency (§10a): average ranks, Pearson and Spearman correlations (with scipy's p-value)
//! and the Spearman partial correlation of Ren et al.

use serde::{Deserialize, Serialize};

/// Count, mean and sample standard deviation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of values.
    pub n: usize,
    /// Mean (NaN when empty).
    pub mean: f64,
    /// Sample standard deviation, `ddof = 1` as pandas' `.std()` (NaN when `n < 2`).
    pub std: f64,
}

/// Summarises `xs`.
pub fn summarize(xs: &[f64]) -> Summary {
    let n = xs.len();
    let mean = if n == 0 {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / n as f64
    };
    let std = if n < 2 {
        f64::NAN
    } else {
        (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    };
    Summary { n, mean, std }
}

/// Result of a Welch t-test.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WelchTest {
    /// The t statistic (positive when the first sample's mean is larger).
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value.
    pub p_two_sided: f64,
}

/// Welch's unequal-variance t-test of `a` against `b`; `None` when a side has fewer than two
/// values or both variances are zero (scipy returns NaN there).
pub fn welch_t_test(a: &[f64], b: &[f64]) -> Option<WelchTest> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (sa, sb) = (summarize(a), summarize(b));
    let (va, vb) = (
        sa.std * sa.std / a.len() as f64,
        sb.std * sb.std / b.len() as f64,
    );
    let se2 = va + vb;
    if se2 <= 0.0 || !se2.is_finite() {
        return None;
    }
    let t = (sa.mean - sb.mean) / se2.sqrt();
    let df = se2 * se2 / (va * va / (a.len() - 1) as f64 + vb * vb / (b.len() - 1) as f64);
    let p = 2.0 * (1.0 - student_t_cdf(t.abs(), df));
    Some(WelchTest {
        t,
        df,
        p_two_sided: p.clamp(0.0, 1.0),
    })
}

/// `ln Γ(x)` for `x > 0` (Lanczos approximation, g = 7, 9 terms; ~15 significant digits).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx).
        let s = (std::f64::consts::PI * x).sin();
        return (std::f64::consts::PI / s.abs()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut acc = COEF[0];
    for (i, &c) in COEF.iter().enumerate().skip(1) {
        acc += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + acc.ln()
}

/// The continued fraction of `I_x(a, b)` (modified Lentz), valid for `x < (a+1)/(a+b+2)`.
fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=500 {
        let m = f64::from(m);
        // Even step.
        let num = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { 1.0 / TINY } else { 1.0 / d };
        c = 1.0 + num / c;
        if c.abs() < TINY {
            c = TINY;
        }
        h *= d * c;
        // Odd step.
        let num = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { 1.0 / TINY } else { 1.0 / d };
        c = 1.0 + num / c;
        if c.abs() < TINY {
            c = TINY;
        }
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// The regularised incomplete beta function `I_x(a, b)` for `a, b > 0`, `0 ≤ x ≤ 1`.
pub fn regularized_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x.is_nan() || a <= 0.0 || b <= 0.0 {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(x, a, b) / a
    } else {
        1.0 - front * beta_fraction(1.0 - x, b, a) / b
    }
}

/// The CDF of Student's t distribution with `df > 0` degrees of freedom.
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    if t.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if t.is_infinite() {
        return if t > 0.0 { 1.0 } else { 0.0 };
    }
    let x = df / (df + t * t);
    let tail = 0.5 * regularized_incomplete_beta(x, 0.5 * df, 0.5);
    if t > 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// Ranks of `xs` from 1, ties given the average of the ranks they span (`scipy.stats.rankdata`,
/// `method="average"`).
// Ties are exact equality, as scipy's.
#[allow(clippy::float_cmp)]
pub fn average_ranks(xs: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut ranks = vec![0.0; xs.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && xs[order[end]] == xs[order[start]] {
            end += 1;
        }
        // Positions start..end (0-based) hold ranks start+1..=end; their mean:
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Pearson's correlation of `a` and `b`; NaN when either is constant or has fewer than two
/// values (as `scipy.stats.pearsonr` returns NaN there).
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return f64::NAN;
    }
    let (ma, mb) = (
        a[..n].iter().sum::<f64>() / n as f64,
        b[..n].iter().sum::<f64>() / n as f64,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a[..n].iter().zip(&b[..n]) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa <= 0.0 || sbb <= 0.0 {
        return f64::NAN;
    }
    (sab / (saa.sqrt() * sbb.sqrt())).clamp(-1.0, 1.0)
}

/// Spearman's rank correlation and its two-sided p-value as `scipy.stats.spearmanr` computes
/// them: Pearson of the average ranks, `t = r·sqrt((n-2) / ((1+r)(1-r)))` against Student's t
/// with `n - 2` degrees of freedom. `None` with fewer than 3 values or a constant side (scipy's
/// NaN).
pub fn spearman(a: &[f64], b: &[f64]) -> Option<(f64, f64)> {
    let n = a.len().min(b.len());
    if n < 3 {
        return None;
    }
    let r = pearson(&average_ranks(&a[..n]), &average_ranks(&b[..n]));
    if r.is_nan() {
        return None;
    }
    let df = (n - 2) as f64;
    let t = r * (df / ((r + 1.0) * (1.0 - r))).max(0.0).sqrt();
    let p = if t.is_nan() {
        f64::NAN
    } else {
        2.0 * (1.0 - student_t_cdf(t.abs(), df))
    };
    Some((r, p.clamp(0.0, 1.0)))
}

/// Residuals of the least-squares fit `y ≈ a + b·z` (statsmodels' `OLS(y, add_constant(z))`);
/// with a constant `z`, `y - mean(y)` (the minimum-norm solution).
pub fn ols_residuals(y: &[f64], z: &[f64]) -> Vec<f64> {
    let n = y.len().min(z.len());
    if n == 0 {
        return Vec::new();
    }
    let (my, mz) = (
        y[..n].iter().sum::<f64>() / n as f64,
        z[..n].iter().sum::<f64>() / n as f64,
    );
    let szz: f64 = z[..n].iter().map(|v| (v - mz).powi(2)).sum();
    let szy: f64 = z[..n]
        .iter()
        .zip(&y[..n])
        .map(|(a, b)| (a - mz) * (b - my))
        .sum();
    let slope = if szz > 0.0 { szy / szz } else { 0.0 };
    (0..n).map(|i| y[i] - my - slope * (z[i] - mz)).collect()
}

/// The Spearman partial correlation of `x` and `y` controlling for `z`, as Ren et al.'s
/// `calculate_spearman_partial_correlation`: rank all three (average ranks), regress the ranks
/// of `x` and of `y` on the ranks of `z` (OLS with an intercept), then Spearman's correlation
/// of the two residual vectors with its p-value. `None` where scipy gives NaN.
pub fn spearman_partial(x: &[f64], y: &[f64], z: &[f64]) -> Option<(f64, f64)> {
    let rz = average_ranks(z);
    let ex = ols_residuals(&average_ranks(x), &rz);
    let ey = ols_residuals(&average_ranks(y), &rz);
    spearman(&ey, &ex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    #[test]
    fn ln_gamma_matches_known_values() {
        // Γ(1) = Γ(2) = 1, Γ(0.5) = √π, Γ(10) = 9!, Γ(2.5) = 1.5·0.5·√π.
        let pi = std::f64::consts::PI;
        assert!(close(ln_gamma(1.0), 0.0, 1e-14));
        assert!(close(ln_gamma(2.0), 0.0, 1e-14));
        assert!(close(ln_gamma(0.5), pi.sqrt().ln(), 1e-14));
        assert!(close(ln_gamma(10.0), 362_880f64.ln(), 1e-13));
        assert!(close(ln_gamma(2.5), (0.75 * pi.sqrt()).ln(), 1e-13));
        // Stirling series at 100.3 (relative error of the series ~1e-12 at this x).
        let x: f64 = 100.3;
        let stirling = (x - 0.5) * x.ln() - x + 0.5 * (2.0 * pi).ln() + 1.0 / (12.0 * x)
            - 1.0 / (360.0 * x.powi(3));
        assert!(close(ln_gamma(x), stirling, 1e-12));
    }

    #[test]
    fn incomplete_beta_matches_closed_forms() {
        // I_x(1, 1) = x; I_x(a, 1) = x^a; I_x(1, b) = 1 − (1−x)^b; symmetry I_x(a,b) = 1 − I_{1−x}(b,a).
        for &x in &[0.001, 0.2, 0.5, 0.8, 0.999] {
            assert!(close(regularized_incomplete_beta(x, 1.0, 1.0), x, 1e-13));
            assert!(close(
                regularized_incomplete_beta(x, 3.5, 1.0),
                x.powf(3.5),
                1e-12
            ));
            assert!(close(
                regularized_incomplete_beta(x, 1.0, 30.0),
                1.0 - (1.0 - x).powi(30),
                1e-12
            ));
            let (a, b) = (0.5, 20.0);
            let lhs = regularized_incomplete_beta(x, a, b);
            let rhs = 1.0 - regularized_incomplete_beta(1.0 - x, b, a);
            assert!((lhs - rhs).abs() < 1e-12, "{x}: {lhs} vs {rhs}");
        }
        assert!(regularized_incomplete_beta(0.0, 2.0, 3.0).abs() < f64::EPSILON);
        assert!((regularized_incomplete_beta(1.0, 2.0, 3.0) - 1.0).abs() < f64::EPSILON);
        assert!(regularized_incomplete_beta(0.5, -1.0, 3.0).is_nan());
    }

    #[test]
    fn student_t_matches_closed_forms() {
        // df = 1 is Cauchy: 1/2 + atan(t)/π; df = 2: 1/2 + t / (2√(2 + t²)).
        for &t in &[-7.0, -1.3, 0.0, 0.4, 2.0, 25.0] {
            let cauchy = 0.5 + f64::atan(t) / std::f64::consts::PI;
            assert!((student_t_cdf(t, 1.0) - cauchy).abs() < 1e-13, "{t}");
            let two = 0.5 + t / (2.0 * (2.0 + t * t).sqrt());
            assert!((student_t_cdf(t, 2.0) - two).abs() < 1e-13, "{t}");
        }
        // Large df approaches the normal: Φ(1.96) = 0.975002104851780.
        assert!((student_t_cdf(1.96, 1e7) - 0.975_002_104_851_78).abs() < 1e-6);
    }

    #[test]
    fn welch_matches_scipy() {
        // The statistic, the Welch–Satterthwaite df and the p-value from their definitions
        // (as scipy.stats.ttest_ind(a, b, equal_var=False) computes them).
        let a = [0.5, 0.7, 1.0, 0.2, 0.9];
        let b = [0.3, 0.1, 0.4, 0.35, 0.2, 0.05, 0.6];
        let w = welch_t_test(&a, &b).expect("enough values");
        let (sa, sb) = (summarize(&a), summarize(&b));
        let (va, vb) = (sa.std.powi(2) / 5.0, sb.std.powi(2) / 7.0);
        assert!(close(w.t, (sa.mean - sb.mean) / (va + vb).sqrt(), 1e-14));
        assert!(close(
            w.df,
            (va + vb).powi(2) / (va * va / 4.0 + vb * vb / 6.0),
            1e-14
        ));
        assert!(close(
            2.0 * (1.0 - student_t_cdf(w.t, w.df)),
            w.p_two_sided,
            1e-12
        ));
        // Independent reference: 2·∫_t^∞ of the t density, by Simpson's rule in numpy on
        // x = t/u (2,000,001 points) = 0.0583802962860194.
        assert!(
            (w.p_two_sided - 0.058_380_296_286_019_4).abs() < 1e-12,
            "{w:?}"
        );
        // Identical samples: t = 0, p = 1.
        let same = welch_t_test(&a, &a).expect("enough values");
        assert!(same.t.abs() < f64::EPSILON);
        assert!((same.p_two_sided - 1.0).abs() < 1e-12);
        assert!(welch_t_test(&[1.0], &b).is_none());
        assert!(welch_t_test(&[1.0, 1.0], &[2.0, 2.0]).is_none());
    }

    #[test]
    fn summary_uses_sample_std() {
        let s = summarize(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(s.n, 4);
        assert!((s.mean - 2.5).abs() < 1e-15);
        assert!((s.std - (5.0f64 / 3.0).sqrt()).abs() < 1e-15);
        assert!(summarize(&[]).mean.is_nan());
        assert!(summarize(&[1.0]).std.is_nan());
    }

    /// X, Y, Z, the partial correlation and its p-value.
    type Case<'a> = (&'a [f64], &'a [f64], &'a [f64], f64, f64);

    #[test]
    fn ranks_correlations_and_the_partial_correlation_match_scipy() {
        // scipy.stats.rankdata([3, 1, 2, 3, 3]) = [4, 1, 2, 4, 4].
        assert_eq!(
            average_ranks(&[3.0, 1.0, 2.0, 3.0, 3.0]),
            vec![4.0, 1.0, 2.0, 4.0, 4.0]
        );
        // scipy.stats.pearsonr([3, 1, 2, 3], [3, 1, 2, 4]).statistic = 0.9438798074485389.
        assert!(close(
            pearson(&[3.0, 1.0, 2.0, 3.0], &[3.0, 1.0, 2.0, 4.0]),
            0.943_879_807_448_538_9,
            1e-12
        ));
        assert!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
        // Expected values computed with Python 3.11, numpy 2, scipy 1.17.1:
        //   rx, ry, rz = rankdata(X), rankdata(Y), rankdata(Z)
        //   A = column_stack([ones_like(rz), rz])
        //   ex = rx - A @ lstsq(A, rx)[0]; ey = ry - A @ lstsq(A, ry)[0]
        //   spearmanr(ey, ex) -> (statistic, pvalue)
        // (the procedure of Self-Aligning's eval/analyse/partial_correlation.py).
        let cases: [Case<'_>; 3] = [
            (
                &[95.0, 80.0, 90.0, 85.0, 70.0],
                &[0.6, 0.5, 0.4, 0.55, 0.45],
                &[0.3, 0.3, 0.35, 0.3, 0.32],
                0.670_820_393_249_936_8,
                0.215_169_942_569_550_22,
            ),
            (
                &[94.4, 91.0, 88.5, 90.2, 85.1, 92.3, 89.9],
                &[0.52, 0.45, 0.49, 0.47, 0.41, 0.44, 0.50],
                &[0.40, 0.42, 0.39, 0.41, 0.40, 0.43, 0.38],
                0.642_857_142_857_143,
                0.119_392_373_427_411_09,
            ),
            (
                &[90.0, 80.0, 85.0, 70.0],
                &[0.5, 0.6, 0.4, 0.45],
                &[0.3, 0.2, 0.25, 0.22],
                0.6,
                0.4,
            ),
        ];
        for (x, y, z, rho, p) in cases {
            let (r, pv) = spearman_partial(x, y, z).expect("defined");
            assert!(close(r, rho, 1e-9), "{r} vs {rho}");
            assert!(close(pv, p, 1e-7), "{pv} vs {p}");
        }
        // Two values, or a constant residual: undefined.
        assert!(spearman_partial(&[1.0, 2.0], &[1.0, 2.0], &[1.0, 2.0]).is_none());
        assert!(spearman_partial(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).is_none());
    }
}
