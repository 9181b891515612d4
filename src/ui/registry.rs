//! One registration point per analysis view: the [`AnalysisView`] trait an analysis implements
//! once (its id and label, the job its main button runs, how it takes its result, how it draws,
//! what it exports), and [`builtin`], the list the app shows. The app loops over the list for
//! navigation, jobs, results and export; it has no per-analysis code. `docs/architecture.md`
//! gives the recipe for adding one.

use std::any::Any;
use std::path::{Path, PathBuf};

use eframe::egui;

use crate::ui::actions::{Action, PendingJob};
use crate::ui::app::SlotView;
use crate::ui::dialogs::DialogKind;
use crate::ui::panels;
use crate::ui::state::AppState;
use crate::worker::{Event, Job, JobOutput, Slot};

/// Writes what a view shows into a folder under a file stem; returns the files written. Runs on
/// the export thread, so it owns a copy of the data.
pub type Exporter = Box<dyn FnOnce(&Path, &str) -> crate::Result<Vec<PathBuf>> + Send>;

/// What an analysis sees when its main button is pressed.
pub struct RunCx<'a> {
    /// The persisted settings (the prompt, each view's settings).
    pub state: &'a AppState,
    /// Slots A and B.
    pub slots: &'a [SlotView; 2],
}

impl RunCx<'_> {
    /// The loaded slots, or why there are none.
    pub fn loaded(&self) -> Result<Vec<Slot>, String> {
        let slots: Vec<Slot> = [Slot::A, Slot::B]
            .into_iter()
            .zip(self.slots)
            .filter(|(_, view)| view.info.is_some())
            .map(|(slot, _)| slot)
            .collect();
        if slots.is_empty() {
            return Err("Load a model into slot A or B first".to_owned());
        }
        Ok(slots)
    }

    /// The loaded slots when there is also a prompt to run them on.
    pub fn loaded_with_prompt(&self) -> Result<Vec<Slot>, String> {
        let slots = self.loaded()?;
        if self.state.prompt.trim().is_empty() {
            return Err("The prompt is empty".to_owned());
        }
        Ok(slots)
    }
}

/// What an analysis view draws with.
pub struct ViewCx<'a> {
    /// The persisted settings, for the view to edit.
    pub state: &'a mut AppState,
    /// Slots A and B.
    pub slots: &'a [SlotView; 2],
    /// This view's running job, if any.
    pub running: Option<&'a PendingJob>,
    /// The last export's outcome.
    pub note: Option<&'a str>,
    /// Where the view's buttons put what the user asked for.
    pub actions: &'a mut Vec<Action>,
}

impl ViewCx<'_> {
    /// Whether any slot holds a model.
    pub fn any_loaded(&self) -> bool {
        self.slots.iter().any(|s| s.info.is_some())
    }
}

/// An analysis as the GUI knows it. Implemented once per analysis, in its view file.
pub trait AnalysisView: Any {
    /// Stable id: the navigation entry, the pending-job owner, the persisted selected view.
    fn id(&self) -> &'static str;

    /// The navigation label.
    fn label(&self) -> &'static str;

    /// The job of the view's main button ([`Action::Run`]) and the status line's label for it,
    /// or the reason it cannot run (shown as the error).
    fn job(&mut self, cx: &RunCx<'_>) -> Result<(Job, String), String>;

    /// A streamed event of one of its jobs (training steps, say). Most views need none.
    fn on_event(&mut self, _event: &Event) {}

    /// Takes the finished output of one of its jobs; hands back an output it does not own.
    fn take(&mut self, output: JobOutput, state: &mut AppState) -> Result<(), JobOutput>;

    /// Draws the view.
    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>);

    /// The default file stem of an export (view, models, context), or `None` when there is
    /// nothing to export yet.
    fn export_stem(&self, state: &AppState) -> Option<String>;

    /// The writer of what the view shows (the same function the CLI's `--out` calls).
    fn exporter(&self, state: &AppState) -> Option<Exporter>;

    /// A path picked in a dialog of a kind only this view asks for (the merged-model folder,
    /// say): the job it starts, if any.
    fn picked(&mut self, _kind: DialogKind, _path: PathBuf) -> Option<(Job, String)> {
        None
    }

    /// For tests and typed access ([`crate::ui::TunelensApp::view`]).
    fn as_any(&self) -> &dyn Any;
}

/// The built-in analysis views, in navigation order (after Models and Prompt). One line each.
pub fn builtin() -> Vec<Box<dyn AnalysisView>> {
    vec![
        Box::new(panels::attribution::AttributionView::default()),
        Box::new(panels::weights::ConceptsView::default()),
        Box::new(panels::weights::HeadsView::default()),
        Box::new(panels::consistency::ConsistencyView::default()),
        Box::new(panels::iv::IvView::default()),
        Box::new(panels::shift::ShiftView::default()),
        Box::new(panels::knowledge::KnowledgeView::default()),
        Box::new(panels::finetune::FinetuneView::default()),
    ]
}
