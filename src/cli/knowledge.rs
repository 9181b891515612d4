//! `tunelens knowledge` (METHODS.md §10a): knowledge consistency of a base model (slot A) and
//! one or more tuned models (each loaded into slot B in turn), with the figure and tables
//! written by `--out` and, from 3 tuned models, the partial correlation across them.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::analysis::knowledge::{partial_correlation, KnowledgeConfig, KnowledgeRun};
use crate::cli::{pct, Cli, ModelArg};
use crate::error::Error;
use crate::worker::knowledge::{KnowledgeSettings, QuestionSource, TunedTemplate};
use crate::worker::{Job, JobOutput};

/// `tunelens knowledge`.
#[derive(Debug, Args)]
pub struct KnowledgeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A tuned model (slot B); repeat to compare several tuned variants of the base.
    #[arg(long = "model-b", required = true)]
    models_b: Vec<String>,
    /// Questions: a file in MMLU's CSV layout (no header; question, choices, answer letter;
    /// the subject from the file name), a JSONL file of {"question", "choices", "answer",
    /// "subject"?}, a folder of such files (`*_dev` files in it are dev examples), or a shipped
    /// set: knowledge (all), or one of its relations (author, capital, ...). Repeatable.
    #[arg(long = "questions", required = true, num_args = 1..)]
    questions: Vec<String>,
    /// Dev examples for the base model's shots (a file or a folder), matched by subject;
    /// without it, the dev files beside the questions or else the subject's other questions.
    #[arg(long = "dev")]
    dev: Vec<String>,
    /// Dev examples in the base model's prompt.
    #[arg(long, default_value_t = 5)]
    shots: usize,
    /// The tuned model's prompt: chat (its own template), vicuna, or base (the base model's
    /// 5-shot prompt: the identity check).
    #[arg(long = "tuned-template", default_value = "chat")]
    tuned_template: String,
    /// Put the header line before the tuned model's question too.
    #[arg(long)]
    hint: bool,
    /// Read at most N questions per file.
    #[arg(long = "max-questions")]
    max_questions: Option<usize>,
    /// Choice labels, comma-separated (default A,B,C,...).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Prompts per forward pass.
    #[arg(long = "batch-size", default_value_t = 8)]
    batch_size: usize,
    /// Write the figure (SVG, PNG), the tables (CSV) and the JSON into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// File stem of the `--out` files.
    #[arg(long, requires = "out")]
    stem: Option<String>,
}

/// The settings the flags describe.
pub fn settings(args: &KnowledgeArgs) -> anyhow::Result<KnowledgeSettings> {
    let Some(tuned_template) = TunedTemplate::parse(&args.tuned_template) else {
        return Err(Error::invalid(
            "--tuned-template",
            format!("`{}` (expected chat, vicuna or base)", args.tuned_template),
        )
        .into());
    };
    if args.labels.iter().any(|l| l.trim().is_empty()) {
        return Err(Error::invalid("--labels", "a label is empty").into());
    }
    Ok(KnowledgeSettings {
        questions: args
            .questions
            .iter()
            .map(|q| QuestionSource::from_arg(q))
            .collect(),
        dev: args
            .dev
            .iter()
            .map(|d| QuestionSource::from_arg(d))
            .collect(),
        config: KnowledgeConfig {
            shots: args.shots,
            tuned_template,
            hint: args.hint,
            max_questions: args.max_questions,
            labels: args.labels.iter().map(|l| l.trim().to_owned()).collect(),
            batch_size: args.batch_size.max(1),
            ..KnowledgeConfig::default()
        },
    })
}

/// Runs `tunelens knowledge`.
pub(super) fn run(cli: &Cli, args: &KnowledgeArgs) -> anyhow::Result<()> {
    let settings = settings(args)?;
    // Bad question files fail before any model is loaded.
    crate::worker::knowledge::load_questions(&settings)?;
    let job = || Job::Knowledge {
        settings: settings.clone(),
    };
    let runs = super::run_per_tuned(cli, &args.model.model, &args.models_b, job)?
        .into_iter()
        .map(|output| match output {
            JobOutput::Knowledge(run) => Ok(*run),
            _ => Err(anyhow::anyhow!("the knowledge job returned another result")),
        })
        .collect::<anyhow::Result<Vec<KnowledgeRun>>>()?;
    super::print_report(cli, &runs, |runs| text_report(runs))?;
    if let Some(dir) = &args.out {
        let stem = args.stem.as_deref().unwrap_or("knowledge");
        for path in crate::export::knowledge::write_knowledge(dir, stem, &runs)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// The readable report: per tuned model the means and accuracies overall and per subject; the
/// partial correlation across the tuned models.
pub fn text_report(runs: &[KnowledgeRun]) -> String {
    let mut s = String::new();
    for run in runs {
        let o = &run.overall;
        let _ = writeln!(
            s,
            "# knowledge consistency (METHODS.md §10a): base {} (5-shot) vs tuned {} ({}, {} shots for the base)",
            run.base_model,
            run.tuned_model,
            run.config.tuned_template.name(),
            run.config.shots
        );
        for note in &run.notes {
            let _ = writeln!(s, "note: {note}");
        }
        let _ = writeln!(
            s,
            "{} questions: mean rho {:.4}, mean KL {:.5}, mean cosine {:.4}, accuracy base {}, tuned {}",
            o.questions,
            o.rho,
            o.kl,
            o.cosine,
            pct(o.base_accuracy),
            pct(o.tuned_accuracy)
        );
        let _ = writeln!(
            s,
            "subject\tquestions\trho\tKL\tcosine\tbase_acc\ttuned_acc"
        );
        for g in &run.subjects {
            let _ = writeln!(
                s,
                "{}\t{}\t{:.4}\t{:.5}\t{:.4}\t{}\t{}",
                g.name,
                g.questions,
                g.rho,
                g.kl,
                g.cosine,
                pct(g.base_accuracy),
                pct(g.tuned_accuracy)
            );
        }
        let _ = writeln!(s);
    }
    let pc = partial_correlation(runs);
    match (pc.rho, pc.p_value) {
        (Some(r), Some(p)) => {
            let _ = writeln!(
                s,
                "partial correlation of 100*rho and tuned accuracy given base accuracy, over {} tuned models: {r:.4} (p = {p:.4})",
                pc.runs
            );
        }
        _ => {
            let _ = writeln!(
                s,
                "partial correlation: {}",
                pc.note.unwrap_or_else(|| "undefined".to_owned())
            );
        }
    }
    s
}
