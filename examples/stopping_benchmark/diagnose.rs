//! `diagnose`: why the reliance signal follows memorization on some networks and not on others,
//! from the measurements `run --diagnostics` records at every check (each probe's curve alone,
//! the mean clamp, the noise curve, the agreement curve on the subset's clean, memorized and
//! unfit samples). Prints markdown tables, writes their numbers as JSON and a few plots.
//!
//! The runs' `fit_corrupted` (the share of corrupted training labels the network predicts) is an
//! oracle of memorization — it needs to know which labels were corrupted — used here only to
//! explain, never by a stopping criterion.

use crate::common::mean_sd;
use crate::report::Run;
use anyhow::{bail, Result};
use candle_reliance::plot::{Plot, Series};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct DiagnoseArgs {
    /// Results files written by `run` (JSON lines); full runs with noise ≥ 0.2 are used.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Folder for the JSON summary and the plots.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/results/stopping/diagnosis"))]
    out: PathBuf,
    /// Use the runs of `run --quick` (a smoke test), which are left out otherwise.
    #[arg(long)]
    quick: bool,
}

/// What the tables read of a run beyond the report's accessors.
impl Run {
    fn label(&self) -> String {
        format!(
            "{}, {}, noise {}, seed {}",
            self.set(),
            self.str("optim"),
            self.v["noise"],
            self.v["seed"]
        )
    }
    /// Epochs with a check (from 2, the monitor's default warm-up).
    fn check_epochs(&self) -> Vec<usize> {
        (2..=self.epochs().len())
            .filter(|&e| self.epochs()[e - 1].get("check").is_some())
            .collect()
    }
    fn check(&self, epoch: usize) -> &Value {
        &self.epochs()[epoch - 1]["check"]
    }
    /// The epoch of the best test accuracy (the earlier among equals).
    fn best_epoch(&self) -> usize {
        (1..=self.epochs().len())
            .max_by(|&a, &b| {
                self.f(a, "test_acc")
                    .total_cmp(&self.f(b, "test_acc"))
                    .then(b.cmp(&a))
            })
            .unwrap_or(1)
    }
}

/// Mean of the first three entries of an array field (the default check's orders).
fn mean3(v: &Value) -> f64 {
    let a: Vec<f64> = v
        .as_array()
        .map(|a| a.iter().take(3).filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    if a.is_empty() {
        f64::NAN
    } else {
        a.iter().sum::<f64>() / a.len() as f64
    }
}

/// The default check's agreement AUC; runs recorded before the agreement curve measured it as a
/// separate curve against the model's own predictions (`self_auc`), the same quantity.
fn agreement(c: &Value) -> f64 {
    match c.get("agreement_auc") {
        Some(a) => mean3(a),
        None => mean3(&c["self_auc"]),
    }
}

/// The signals compared in the first table, by name, from one check.
fn signals(c: &Value) -> Vec<(String, f64)> {
    let acc0 = c["acc0"].as_f64().unwrap_or(f64::NAN);
    let mut out = vec![
        ("agreement AUC (default)".into(), agreement(c)),
        ("accuracy AUC (the paper's)".into(), mean3(&c["auc"])),
        ("normalized AUC".into(), mean3(&c["auc"]) / acc0),
    ];
    let d = &c["diag"];
    if d.is_object() {
        out.push((
            "agreement AUC, mean clamp".into(),
            mean3(&d["mean_clamp"]["agreement_auc"]),
        ));
        out.push((
            "noise AUC (accuracy)".into(),
            d["noise"]["auc"].as_f64().unwrap_or(f64::NAN),
        ));
        out.push((
            "noise AUC (agreement)".into(),
            d["noise"]["agreement_auc"].as_f64().unwrap_or(f64::NAN),
        ));
        for (i, p) in d["per_probe"].as_array().into_iter().flatten().enumerate() {
            out.push((
                format!(
                    "agreement AUC, probe {} ({} units) alone",
                    i + 1,
                    p["units"]
                ),
                mean3(&p["agreement_auc"]),
            ));
        }
    }
    out.push(("probe-data accuracy (unablated)".into(), acc0));
    out
}

/// Spearman's rank correlation (average ranks for ties); NaN when either side is constant.
fn spearman(x: &[f64], y: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for k in i..=j {
                r[idx[k]] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let (mx, my) = (mean_sd(&rx).0, mean_sd(&ry).0);
    let num: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let den = (rx.iter().map(|a| (a - mx).powi(2)).sum::<f64>()
        * ry.iter().map(|b| (b - my).powi(2)).sum::<f64>())
    .sqrt();
    num / den
}

/// The full runs with noise ≥ 0.2.
fn load(paths: &[PathBuf], quick: bool) -> Result<Vec<Run>> {
    Ok(crate::report::load(paths, quick)?
        .into_iter()
        .filter(|r| r.str("kind") == "full" && r.v["noise"].as_f64().unwrap_or(0.0) >= 0.2)
        .collect())
}

fn fmt(x: f64) -> String {
    if x.is_finite() {
        format!("{x:+.2}")
    } else {
        "–".into()
    }
}

pub fn diagnose(args: DiagnoseArgs) -> Result<()> {
    let runs = load(&args.runs, args.quick)?;
    if runs.is_empty() {
        bail!("no full runs with noise ≥ 0.2 in {:?}", args.runs);
    }
    std::fs::create_dir_all(&args.out)?;
    let mut by_set: BTreeMap<String, Vec<&Run>> = BTreeMap::new();
    for r in &runs {
        by_set.entry(r.set()).or_default().push(r);
    }
    let mut summary = serde_json::Map::new();

    // 1. Each signal against time, test accuracy and (oracle) memorization, within each run.
    println!("## How each signal moves within a run\n");
    println!(
        "Spearman's ρ between a signal and, over the checks of one run: the epoch; the test \
         accuracy; the share of corrupted labels the network fits (`fit_corrupted`, an oracle of \
         memorization). Mean over the runs (noise ≥ 0.2). A signal that tracks memorization has \
         ρ(memorization) near −1 (the AUCs fall as reliance rises).\n"
    );
    for (set, rs) in &by_set {
        println!("### {set} ({} runs)\n", rs.len());
        println!("| signal | ρ(epoch) | ρ(test accuracy) | ρ(memorization) |");
        println!("|---|---|---|---|");
        let mut rows: BTreeMap<usize, (String, Vec<[f64; 3]>)> = BTreeMap::new();
        for r in rs {
            let eps = r.check_epochs();
            let per: Vec<Vec<(String, f64)>> = eps.iter().map(|&e| signals(r.check(e))).collect();
            let x_epoch: Vec<f64> = eps.iter().map(|&e| e as f64).collect();
            let x_test: Vec<f64> = eps.iter().map(|&e| r.f(e, "test_acc")).collect();
            let x_mem: Vec<f64> = eps.iter().map(|&e| r.f(e, "fit_corrupted")).collect();
            for (i, (name, _)) in per[0].iter().enumerate() {
                let y: Vec<f64> = per.iter().map(|s| s[i].1).collect();
                let entry = rows.entry(i).or_insert((name.clone(), vec![]));
                entry.1.push([
                    spearman(&y, &x_epoch),
                    spearman(&y, &x_test),
                    spearman(&y, &x_mem),
                ]);
            }
        }
        let mut json_rows = serde_json::Map::new();
        for (name, vals) in rows.values() {
            let m = |k: usize| {
                let v: Vec<f64> = vals
                    .iter()
                    .map(|x| x[k])
                    .filter(|x| x.is_finite())
                    .collect();
                if v.is_empty() {
                    f64::NAN
                } else {
                    mean_sd(&v).0
                }
            };
            println!("| {name} | {} | {} | {} |", fmt(m(0)), fmt(m(1)), fmt(m(2)));
            json_rows.insert(
                name.clone(),
                json!({"rho_epoch": m(0), "rho_test_acc": m(1), "rho_memorization": m(2), "runs": vals.len()}),
            );
        }
        println!();
        summary.insert(format!("{set}/signals"), Value::Object(json_rows));
    }

    // 2. Memorization and the agreement of each group of samples, at the best epoch and the last.
    println!("## Who the agreement curve is made of\n");
    println!(
        "At the first check, the epoch of best test accuracy and the last epoch: the share of corrupted labels \
         the network fits (oracle), the subset's memorized samples (corrupted label, predicted), \
         and the agreement AUC of the subset's clean-label, memorized and unfit-noisy samples. \
         Mean over runs.\n"
    );
    println!("| set | optimizer | epoch | fit corrupted | memorized in subset | agreement AUC: all | clean | memorized | unfit noisy |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut groups_json = serde_json::Map::new();
    for (set, rs) in &by_set {
        let mut optims: Vec<String> = rs
            .iter()
            .map(|r| r.v["optim"].as_str().unwrap_or("").to_string())
            .collect();
        optims.dedup();
        optims.sort();
        optims.dedup();
        for optim in &optims {
            let sel: Vec<&&Run> = rs
                .iter()
                .filter(|r| r.v["optim"] == optim.as_str())
                .collect();
            if !sel
                .iter()
                .all(|r| r.check(r.check_epochs()[0])["diag"].is_object())
            {
                continue;
            }
            for which in ["first check", "best", "last"] {
                let mut acc: [Vec<f64>; 6] = Default::default();
                for r in &sel {
                    let e = match which {
                        "first check" => r.check_epochs()[0],
                        "best" => r.best_epoch().max(2),
                        _ => r.epochs().len(),
                    };
                    let g = &r.check(e)["diag"]["groups"];
                    acc[0].push(r.f(e, "fit_corrupted"));
                    acc[1].push(g["memorized"]["n"].as_f64().unwrap_or(0.0));
                    acc[2].push(agreement(r.check(e)));
                    acc[3].push(mean3(&g["clean"]["agreement_auc"]));
                    acc[4].push(mean3(&g["memorized"]["agreement_auc"]));
                    acc[5].push(mean3(&g["unfit_noisy"]["agreement_auc"]));
                }
                let m: Vec<f64> = acc
                    .iter()
                    .map(|v| {
                        let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
                        if v.is_empty() {
                            f64::NAN
                        } else {
                            mean_sd(&v).0
                        }
                    })
                    .collect();
                let g = |x: f64| {
                    if x.is_finite() {
                        format!("{x:.3}")
                    } else {
                        "– (< 10)".into()
                    }
                };
                println!(
                    "| {set} | {optim} | {which} | {:.3} | {:.0} | {} | {} | {} | {} |",
                    m[0],
                    m[1],
                    g(m[2]),
                    g(m[3]),
                    g(m[4]),
                    g(m[5])
                );
                groups_json.insert(
                    format!("{set}/{optim}/{which}"),
                    json!({"fit_corrupted": m[0], "memorized_in_subset": m[1], "agreement_all": m[2],
                           "agreement_clean": m[3], "agreement_memorized": m[4], "agreement_unfit_noisy": m[5],
                           "runs": sel.len()}),
                );
            }
        }
    }
    println!();
    summary.insert("groups".into(), Value::Object(groups_json));

    // 2b. The shape of the agreement curve: where along the fractions it moves.
    println!("## Where along the curve the agreement moves\n");
    println!(
        "The default check's agreement curve (mean over its orders) with an eighth, a quarter, \
         half and three quarters of the units ablated, at the first check, the epoch of best test accuracy and \
         the last epoch. Mean over runs.\n"
    );
    println!("| set | optimizer | epoch | 1/8 | 1/4 | 1/2 | 3/4 |");
    println!("|---|---|---|---|---|---|---|");
    let mut shape_json = serde_json::Map::new();
    for (set, rs) in &by_set {
        let mut optims: Vec<String> = rs.iter().map(|r| r.str("optim").to_string()).collect();
        optims.sort();
        optims.dedup();
        for optim in &optims {
            let sel: Vec<&&Run> = rs.iter().filter(|r| r.str("optim") == optim).collect();
            for which in ["first check", "best", "last"] {
                let mut at: [Vec<f64>; 4] = Default::default();
                for r in &sel {
                    let e = match which {
                        "first check" => r.check_epochs()[0],
                        "best" => r.best_epoch().max(2),
                        _ => r.epochs().len(),
                    };
                    let curve: Vec<f64> = r.check(e)["agreement"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                        .unwrap_or_default();
                    // The default fractions are i/16.
                    if curve.len() == 17 {
                        for (k, i) in [2, 4, 8, 12].into_iter().enumerate() {
                            at[k].push(curve[i]);
                        }
                    }
                }
                if at[0].is_empty() {
                    continue;
                }
                let m: Vec<f64> = at.iter().map(|v| mean_sd(v).0).collect();
                println!(
                    "| {set} | {optim} | {which} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    m[0], m[1], m[2], m[3]
                );
                shape_json.insert(
                    format!("{set}/{optim}/{which}"),
                    json!({"1/8": m[0], "1/4": m[1], "1/2": m[2], "3/4": m[3], "runs": at[0].len()}),
                );
            }
        }
    }
    println!();
    summary.insert("curve_shape".into(), Value::Object(shape_json));

    // 3. Where the metric peaks, where memorization starts, where the test accuracy is best.
    println!("## Where the metric peaks\n");
    println!(
        "Per run: the epoch of the agreement AUC's highest check, the first epoch whose \
         `fit_corrupted` exceeds its lowest value so far by 0.02 (memorization under way, \
         oracle), and the epoch of best test accuracy. Mean over runs; in parentheses, the runs \
         whose highest check is their first.\n"
    );
    println!(
        "| set | optimizer | agreement peak | memorization starts | best test accuracy | runs |"
    );
    println!("|---|---|---|---|---|---|");
    let mut peaks_json = serde_json::Map::new();
    for (set, rs) in &by_set {
        let mut per_optim: BTreeMap<String, Vec<[f64; 4]>> = BTreeMap::new();
        for r in rs {
            let eps = r.check_epochs();
            let peak = eps
                .iter()
                .copied()
                .max_by(|&a, &b| {
                    agreement(r.check(a))
                        .total_cmp(&agreement(r.check(b)))
                        .then(b.cmp(&a))
                })
                .unwrap_or(2);
            let onset = crate::report::memorization_onset(r).map_or(f64::NAN, |e| e as f64);
            per_optim
                .entry(r.v["optim"].as_str().unwrap_or("").to_string())
                .or_default()
                .push([
                    peak as f64,
                    onset,
                    r.best_epoch() as f64,
                    f64::from(u8::from(peak == eps[0])),
                ]);
        }
        for (optim, v) in &per_optim {
            let m = |k: usize| {
                let x: Vec<f64> = v.iter().map(|a| a[k]).filter(|x| x.is_finite()).collect();
                (mean_sd(&x).0, x.len())
            };
            let (onset, n_onset) = m(1);
            let onset_s = if n_onset == 0 {
                "never (within the budget)".to_string()
            } else if n_onset < v.len() {
                format!(
                    "{onset:.1} ({} of {} runs; never in the others)",
                    n_onset,
                    v.len()
                )
            } else {
                format!("{onset:.1}")
            };
            let first: usize = v.iter().filter(|a| a[3] == 1.0).count();
            println!(
                "| {set} | {optim} | {:.1} ({first} first) | {onset_s} | {:.1} | {} |",
                m(0).0,
                m(2).0,
                v.len()
            );
            peaks_json.insert(
                format!("{set}/{optim}"),
                json!({"agreement_peak_epoch": m(0).0, "memorization_onset_epoch": (n_onset > 0).then_some(onset),
                       "runs_with_onset": n_onset, "best_test_epoch": m(2).0, "peak_at_first_check": first, "runs": v.len()}),
            );
        }
    }
    println!();
    summary.insert("peaks".into(), Value::Object(peaks_json));

    // 4. Noise of the check against the trend: the spread of the three orders' AUCs.
    println!("## The check's own noise\n");
    println!(
        "Per run: the agreement AUC's range over the run (highest minus lowest check) and the \
         mean standard deviation of its three orders at one check. Mean over runs.\n"
    );
    println!("| set | range over the run | sd across orders | runs |");
    println!("|---|---|---|---|");
    let mut noise_json = serde_json::Map::new();
    for (set, rs) in &by_set {
        let (mut ranges, mut sds) = (vec![], vec![]);
        for r in rs {
            let eps = r.check_epochs();
            let vals: Vec<f64> = eps.iter().map(|&e| agreement(r.check(e))).collect();
            let (lo, hi) = vals
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                });
            ranges.push(hi - lo);
            let per: Vec<f64> = eps
                .iter()
                .map(|&e| {
                    let c = r.check(e);
                    let o: Vec<f64> = c
                        .get("agreement_auc")
                        .unwrap_or(&c["self_auc"])
                        .as_array()
                        .map(|a| a.iter().take(3).filter_map(|x| x.as_f64()).collect())
                        .unwrap_or_default();
                    mean_sd(&o).1
                })
                .collect();
            sds.push(mean_sd(&per).0);
        }
        println!(
            "| {set} | {:.3} | {:.3} | {} |",
            mean_sd(&ranges).0,
            mean_sd(&sds).0,
            rs.len()
        );
        noise_json.insert(
            set.clone(),
            json!({"range": mean_sd(&ranges).0, "sd_orders": mean_sd(&sds).0, "runs": rs.len()}),
        );
    }
    println!();
    summary.insert("check_noise".into(), Value::Object(noise_json));

    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&Value::Object(summary))?,
    )?;

    // Plots: for the first seed of each set's plain-SGD cell at the highest noise, the default
    // metric, each probe alone, the noise and mean-clamp agreement, memorization and test
    // accuracy.
    let mut done = std::collections::HashSet::new();
    let mut picks: Vec<&Run> = runs.iter().filter(|r| r.v["optim"] == "sgd").collect();
    picks.sort_by(|a, b| {
        b.v["noise"]
            .as_f64()
            .partial_cmp(&a.v["noise"].as_f64())
            .unwrap()
            .then(a.v["seed"].as_u64().cmp(&b.v["seed"].as_u64()))
    });
    for r in picks {
        if !done.insert(r.set()) || !r.check(2)["diag"].is_object() {
            continue;
        }
        let eps = r.check_epochs();
        let series = |f: &dyn Fn(&Value) -> f64| -> Vec<(f64, f64)> {
            eps.iter().map(|&e| (e as f64, f(r.check(e)))).collect()
        };
        let mut plot = Plot::new(r.label())
            .x_label("epoch")
            .y_label("area under the curve (training subset)")
            .y2_label("test accuracy, memorization (oracle)")
            .series(Series::line(
                "agreement AUC (default)",
                series(&|c| agreement(c)),
            ))
            .series(
                Series::line(
                    "agreement AUC, mean clamp",
                    series(&|c| mean3(&c["diag"]["mean_clamp"]["agreement_auc"])),
                )
                .dashed(),
            )
            .series(
                Series::line(
                    "noise AUC (agreement)",
                    series(&|c| {
                        c["diag"]["noise"]["agreement_auc"]
                            .as_f64()
                            .unwrap_or(f64::NAN)
                    }),
                )
                .dashed(),
            );
        let probes = r.check(2)["diag"]["per_probe"]
            .as_array()
            .map_or(0, |a| a.len());
        for i in 0..probes {
            let name = r.check(2)["diag"]["per_probe"][i]["probe"]
                .as_str()
                .unwrap_or("")
                .to_string();
            plot = plot.series(Series::line(
                format!("agreement AUC, probe {name} alone"),
                series(&|c| mean3(&c["diag"]["per_probe"][i]["agreement_auc"])),
            ));
        }
        let all: Vec<usize> = (1..=r.epochs().len()).collect();
        plot = plot
            .series(
                Series::line(
                    "test accuracy",
                    all.iter()
                        .map(|&e| (e as f64, r.f(e, "test_acc")))
                        .collect(),
                )
                .on_right_axis(),
            )
            .series(
                Series::line(
                    "corrupted labels fitted (oracle)",
                    all.iter()
                        .map(|&e| (e as f64, r.f(e, "fit_corrupted")))
                        .collect(),
                )
                .on_right_axis()
                .dashed(),
            );
        let file = args.out.join(format!(
            "{}-{}-noise{}-seed{}.svg",
            r.set(),
            r.v["optim"].as_str().unwrap_or(""),
            r.v["noise"],
            r.v["seed"]
        ));
        plot.save(&file)?;
        eprintln!("wrote {}", file.display());
    }
    Ok(())
}
