//! A file dialog drawn inside the app: the fallback when the system's dialog cannot open (no xdg
//! desktop portal under a bare window manager or X forwarding from a GPU server), and the
//! dialog itself with `TUNELENS_FILE_DIALOG=builtin`. Folders first, hidden entries skipped,
//! files filtered by the extensions the picker asks for.

use std::path::{Path, PathBuf};

use eframe::egui;

use crate::ui::theme;

/// What the browser picks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrowseMode {
    /// An existing file with one of these extensions (any file when empty).
    OpenFile(Vec<&'static str>),
    /// A folder.
    OpenFolder,
    /// A file name to write, proposed as the given name.
    Save(String),
}

/// One row of the listing.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    name: String,
    is_dir: bool,
}

/// How the browser closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// With this path.
    Picked(PathBuf),
    /// Without a choice.
    Cancelled,
}

/// The browser's state while open.
#[derive(Clone, Debug)]
pub struct FileBrowser {
    /// The window title (what is being picked).
    pub title: String,
    /// What it picks.
    pub mode: BrowseMode,
    /// The folder shown.
    pub dir: PathBuf,
    /// The typed path field (a folder to go to, or a file name to save as).
    pub name: String,
    /// The entry selected in the listing.
    pub selected: Option<String>,
    entries: Vec<Entry>,
    error: Option<String>,
}

impl FileBrowser {
    /// Opens at `start` (the working folder when it is not a folder).
    pub fn new(title: &str, mode: BrowseMode, start: &Path) -> Self {
        let dir = if start.is_dir() {
            start.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"))
        };
        let name = match &mode {
            BrowseMode::Save(name) => name.clone(),
            BrowseMode::OpenFile(_) | BrowseMode::OpenFolder => String::new(),
        };
        let mut browser = Self {
            title: title.to_owned(),
            mode,
            dir,
            name,
            selected: None,
            entries: Vec::new(),
            error: None,
        };
        browser.refresh();
        browser
    }

    /// Reads the folder again; an unreadable folder is shown as an error, not a crash.
    pub fn refresh(&mut self) {
        self.selected = None;
        self.entries.clear();
        self.error = None;
        let read = match std::fs::read_dir(&self.dir) {
            Ok(read) => read,
            Err(err) => {
                self.error = Some(format!("cannot read {}: {err}", self.dir.display()));
                return;
            }
        };
        let wanted = match &self.mode {
            BrowseMode::OpenFile(exts) => exts.clone(),
            BrowseMode::OpenFolder | BrowseMode::Save(_) => Vec::new(),
        };
        for entry in read.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let is_dir = entry.path().is_dir();
            let shown = is_dir
                || match &self.mode {
                    // Shown, not pickable: a model folder is recognised by its files.
                    BrowseMode::OpenFolder | BrowseMode::Save(_) => true,
                    BrowseMode::OpenFile(_) => {
                        wanted.is_empty()
                            || Path::new(&name)
                                .extension()
                                .is_some_and(|e| wanted.iter().any(|w| e.eq_ignore_ascii_case(w)))
                    }
                };
            if shown {
                self.entries.push(Entry { name, is_dir });
            }
        }
        self.entries
            .sort_by(|a, b| b.is_dir.cmp(&a.is_dir).then_with(|| a.name.cmp(&b.name)));
    }

    /// Goes into `dir`.
    pub fn enter(&mut self, dir: PathBuf) {
        self.dir = dir;
        self.refresh();
    }

    /// The path the browser would return now, if any.
    pub fn choice(&self) -> Option<PathBuf> {
        match &self.mode {
            BrowseMode::OpenFolder => Some(
                self.selected
                    .as_ref()
                    .map_or_else(|| self.dir.clone(), |s| self.dir.join(s)),
            ),
            BrowseMode::OpenFile(_) => self
                .selected
                .as_ref()
                .map(|s| self.dir.join(s))
                .filter(|p| p.is_file()),
            BrowseMode::Save(_) => {
                let name = self.name.trim();
                (!name.is_empty()).then(|| self.dir.join(name))
            }
        }
    }

    /// Draws the browser; returns how it closed, once it has.
    pub fn ui(&mut self, ctx: &egui::Context) -> Option<Closed> {
        let mut outcome = None;
        let mut open = true;
        egui::Window::new(self.title.clone())
            .collapsible(false)
            .resizable(true)
            .default_size([560.0, 420.0])
            .open(&mut open)
            .show(ctx, |ui| {
                outcome = self.contents(ui);
            });
        if !open {
            return Some(Closed::Cancelled);
        }
        outcome
    }

    fn contents(&mut self, ui: &mut egui::Ui) -> Option<Closed> {
        let mut go_to: Option<PathBuf> = None;
        ui.horizontal(|ui| {
            if ui.button("Up").on_hover_text("The parent folder").clicked() {
                if let Some(parent) = self.dir.parent() {
                    go_to = Some(parent.to_path_buf());
                }
            }
            if ui.button("Home").clicked() {
                if let Some(home) = std::env::var_os("HOME") {
                    go_to = Some(PathBuf::from(home));
                }
            }
            ui.label(egui::RichText::new(self.dir.display().to_string()).strong());
        });
        if let Some(error) = &self.error {
            ui.label(egui::RichText::new(error).color(theme::ERROR));
        }
        egui::ScrollArea::vertical()
            .id_salt("builtin_file_dialog_list")
            .max_height(280.0)
            .auto_shrink([false, false])
            .show(ui, |ui| {
                for entry in &self.entries {
                    let label = if entry.is_dir {
                        format!("{}/", entry.name)
                    } else {
                        entry.name.clone()
                    };
                    if !entry.is_dir && matches!(self.mode, BrowseMode::OpenFolder) {
                        ui.label(egui::RichText::new(label).color(theme::MUTED));
                        continue;
                    }
                    let selected = self.selected.as_deref() == Some(entry.name.as_str());
                    let response = ui.selectable_label(selected, label);
                    if response.double_clicked() && entry.is_dir {
                        go_to = Some(self.dir.join(&entry.name));
                    } else if response.clicked() {
                        if entry.is_dir && !matches!(self.mode, BrowseMode::OpenFolder) {
                            go_to = Some(self.dir.join(&entry.name));
                        } else {
                            self.selected = Some(entry.name.clone());
                            if matches!(self.mode, BrowseMode::Save(_)) {
                                self.name.clone_from(&entry.name);
                            }
                        }
                    }
                }
                if self.entries.is_empty() && self.error.is_none() {
                    ui.label(egui::RichText::new("(nothing here to pick)").color(theme::MUTED));
                }
            });
        let mut result = None;
        ui.horizontal(|ui| {
            let field = match self.mode {
                BrowseMode::Save(_) => "File name",
                BrowseMode::OpenFile(_) | BrowseMode::OpenFolder => "Go to",
            };
            let label = ui.label(field);
            let edit = ui
                .add(egui::TextEdit::singleline(&mut self.name).desired_width(320.0))
                .labelled_by(label.id);
            let typed = PathBuf::from(self.name.trim());
            if edit.lost_focus()
                && ui.input(|i| i.key_pressed(egui::Key::Enter))
                && !matches!(self.mode, BrowseMode::Save(_))
            {
                let target = if typed.is_absolute() {
                    typed
                } else {
                    self.dir.join(typed)
                };
                if target.is_dir() {
                    go_to = Some(target);
                    self.name.clear();
                } else if target.is_file() && matches!(self.mode, BrowseMode::OpenFile(_)) {
                    result = Some(Closed::Picked(target));
                }
            }
        });
        ui.horizontal(|ui| {
            let action = match self.mode {
                BrowseMode::OpenFile(_) => "Open",
                BrowseMode::OpenFolder => "Choose folder",
                BrowseMode::Save(_) => "Save",
            };
            let choice = self.choice();
            let enabled = choice.is_some();
            if ui.add_enabled(enabled, egui::Button::new(action)).clicked() {
                if let Some(path) = choice {
                    result = Some(Closed::Picked(path));
                }
            }
            if ui.button("Cancel").clicked() {
                result = Some(Closed::Cancelled);
            }
        });
        if let Some(dir) = go_to {
            self.enter(dir);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_folders_first_and_filters_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("models")).expect("dir");
        std::fs::write(dir.path().join("a.gguf"), "x").expect("file");
        std::fs::write(dir.path().join("b.txt"), "x").expect("file");
        std::fs::write(dir.path().join(".hidden.gguf"), "x").expect("file");
        let browser = FileBrowser::new("t", BrowseMode::OpenFile(vec!["gguf"]), dir.path());
        let names: Vec<&str> = browser.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec!["models", "a.gguf"]);
        let folders = FileBrowser::new("t", BrowseMode::OpenFolder, dir.path());
        assert_eq!(folders.entries.len(), 3, "folders, and files shown greyed");
        assert_eq!(folders.choice(), Some(dir.path().to_path_buf()));
        let mut save = FileBrowser::new("t", BrowseMode::Save("fig.svg".into()), dir.path());
        assert_eq!(save.choice(), Some(dir.path().join("fig.svg")));
        save.enter(dir.path().join("no-such-folder"));
        assert!(
            save.error.is_some(),
            "an unreadable folder is an error line"
        );
    }
}
