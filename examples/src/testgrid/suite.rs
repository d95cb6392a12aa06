//! A test suite on disk: `testgrid.toml` (the baseline recipe and the defaults) and one
//! folder per module under `modules/`, each with its test (`test.sh` by default, or a
//! `test.toml` naming its command and time limit). Files people write: parsed strictly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::TestgridError;

/// The manifest's name in a suite's folder.
pub const MANIFEST: &str = "testgrid.toml";
/// Where module folders appear inside every test's container.
pub const MODULES_IN_IMAGE: &str = "/testgrid/modules";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    /// Folder of module folders, relative to the suite (default `modules`).
    #[serde(default = "default_modules")]
    modules: PathBuf,
    baseline: BaselineFile,
    #[serde(default)]
    defaults: DefaultsFile,
}

fn default_modules() -> PathBuf {
    PathBuf::from("modules")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BaselineFile {
    /// A folder with a Dockerfile, relative to the suite.
    context: Option<PathBuf>,
    /// The Dockerfile inside `context` (default `Dockerfile`).
    dockerfile: Option<String>,
    /// Or: an image to run `setup` in, committed as the snapshot.
    from: Option<String>,
    /// Or: an image used as it is (a pipeline's freshly built application image).
    image: Option<String>,
    setup: Option<Vec<String>>,
    /// The baseline's own test, run in the snapshot before any module.
    test: Option<Vec<String>>,
    #[serde(default, with = "humantime_opt")]
    time_limit: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultsFile {
    command: Option<Vec<String>>,
    #[serde(default, with = "humantime_opt")]
    time_limit: Option<Duration>,
    cpu: Option<u64>,
    memory_mb: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModuleFile {
    command: Option<Vec<String>>,
    #[serde(default, with = "humantime_opt")]
    time_limit: Option<Duration>,
}

mod humantime_opt {
    use serde::Deserialize;

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<std::time::Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Some).map_err(|e| serde::de::Error::custom(format!("time limit {text:?}: {e}")))
    }
}

/// How the baseline snapshot is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recipe {
    /// `docker build` of a folder of the suite.
    Dockerfile {
        /// The build context (absolute).
        context: PathBuf,
        /// The Dockerfile in it.
        dockerfile: String,
    },
    /// A setup command run in a container from `from`, then committed.
    Setup {
        /// The base image.
        from: String,
        /// The command.
        command: Vec<String>,
    },
    /// An image on the engine, used as it is.
    Image {
        /// Its reference.
        image: String,
    },
}

/// The baseline: how to make it and how to test it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Baseline {
    /// How the snapshot is made.
    pub recipe: Recipe,
    /// Its own test (run in the snapshot, once per full run).
    pub test: Option<Vec<String>>,
    /// The test's time limit.
    pub time_limit: Duration,
}

/// One module's test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// The folder's name (also the test's name).
    pub name: String,
    /// What runs, in the module's folder inside the container.
    pub command: Vec<String>,
    /// After this long its container is stopped and the test counts as timed out.
    pub time_limit: Duration,
}

/// A loaded suite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suite {
    /// The suite's folder (absolute).
    pub root: PathBuf,
    /// The module folders' parent, relative to `root`.
    pub modules_dir: PathBuf,
    /// The baseline.
    pub baseline: Baseline,
    /// Every module, by name.
    pub modules: Vec<Module>,
    /// CPU (millicores) each test asks of its node.
    pub cpu: u64,
    /// Memory (MiB) each test asks of its node.
    pub memory_mb: u64,
}

const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(60);

fn manifest_error(path: &Path, reason: impl Into<String>) -> TestgridError {
    TestgridError::Manifest { path: path.to_owned(), reason: reason.into() }
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TestgridError> {
    let text = std::fs::read_to_string(path).map_err(|e| manifest_error(path, e.to_string()))?;
    toml::from_str(&text).map_err(|e| manifest_error(path, e.to_string()))
}

impl Suite {
    /// Reads `dir/testgrid.toml` and every module folder.
    pub fn load(dir: &Path) -> Result<Suite, TestgridError> {
        let root = dir.canonicalize().map_err(|e| manifest_error(dir, format!("the suite folder: {e}")))?;
        let manifest = root.join(MANIFEST);
        let file: SuiteFile = read_toml(&manifest)?;
        let time_limit = file.defaults.time_limit.unwrap_or(DEFAULT_TIME_LIMIT);
        let b = file.baseline;
        let recipe = match (b.context, b.from, b.setup) {
            (None, None, None) if b.dockerfile.is_none() && b.image.is_some() => Recipe::Image { image: b.image.unwrap_or_default() },
            _ if b.image.is_some() => {
                return Err(manifest_error(&manifest, "baseline: `image` is a recipe of its own: give no `context`, `from` or `setup` with it"))
            }
            (Some(context), None, None) => {
                let dockerfile = b.dockerfile.unwrap_or_else(|| "Dockerfile".into());
                let context = root.join(context);
                if !context.join(&dockerfile).is_file() {
                    return Err(manifest_error(&manifest, format!("baseline: no {dockerfile} in {}", context.display())));
                }
                Recipe::Dockerfile { context, dockerfile }
            }
            (None, Some(from), Some(command)) if b.dockerfile.is_none() => {
                if command.is_empty() {
                    return Err(manifest_error(&manifest, "baseline.setup is empty"));
                }
                Recipe::Setup { from, command }
            }
            _ => {
                return Err(manifest_error(
                    &manifest,
                    "baseline: give either `context` (a folder with a Dockerfile, and optionally `dockerfile`), `from` and `setup` (a command run in that image and committed), or `image` (used as it is), not more than one",
                ))
            }
        };
        if b.test.as_ref().is_some_and(Vec::is_empty) {
            return Err(manifest_error(&manifest, "baseline.test is empty"));
        }
        let baseline = Baseline { recipe, test: b.test, time_limit: b.time_limit.unwrap_or(time_limit) };
        let default_command = file.defaults.command.unwrap_or_else(|| vec!["sh".into(), "test.sh".into()]);
        if default_command.is_empty() {
            return Err(manifest_error(&manifest, "defaults.command is empty"));
        }
        let modules_root = root.join(&file.modules);
        let mut modules = Vec::new();
        let entries = std::fs::read_dir(&modules_root).map_err(|e| manifest_error(&modules_root, format!("the modules folder: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| manifest_error(&modules_root, e.to_string()))?;
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            keelson_scheduler::validate_id("module name", &name).map_err(|e| manifest_error(&entry.path(), e.to_string()))?;
            let own = entry.path().join("test.toml");
            let module_file: ModuleFile = if own.is_file() { read_toml(&own)? } else { ModuleFile { command: None, time_limit: None } };
            let command = module_file.command.unwrap_or_else(|| default_command.clone());
            if command.is_empty() {
                return Err(manifest_error(&own, "command is empty"));
            }
            modules.push(Module { name, command, time_limit: module_file.time_limit.unwrap_or(time_limit) });
        }
        modules.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Suite {
            root,
            modules_dir: file.modules,
            baseline,
            modules,
            cpu: file.defaults.cpu.unwrap_or(250),
            memory_mb: file.defaults.memory_mb.unwrap_or(128),
        })
    }

    /// The module folders' parent (absolute).
    pub fn modules_root(&self) -> PathBuf {
        self.root.join(&self.modules_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite(manifest: &str, modules: &[(&str, Option<&str>)]) -> (tempfile::TempDir, Result<Suite, TestgridError>) {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join(MANIFEST), manifest).expect("manifest");
        std::fs::create_dir_all(dir.path().join("base")).expect("base");
        std::fs::write(dir.path().join("base/Dockerfile"), "FROM scratch\n").expect("Dockerfile");
        for (name, toml) in modules {
            let m = dir.path().join("modules").join(name);
            std::fs::create_dir_all(&m).expect("module");
            if let Some(t) = toml {
                std::fs::write(m.join("test.toml"), t).expect("test.toml");
            }
        }
        std::fs::create_dir_all(dir.path().join("modules")).expect("modules");
        let loaded = Suite::load(dir.path());
        (dir, loaded)
    }

    #[test]
    fn modules_take_the_defaults_unless_they_say_otherwise() {
        let (_dir, s) = suite(
            "[baseline]\ncontext = \"base\"\n[defaults]\ntime_limit = \"10s\"\n",
            &[("b-slow", Some("time_limit = \"2m\"\ncommand = [\"make\", \"check\"]\n")), ("a", None)],
        );
        let s = s.expect("loads");
        assert_eq!(s.modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["a", "b-slow"]);
        assert_eq!(s.modules[0].command, ["sh", "test.sh"]);
        assert_eq!(s.modules[0].time_limit, Duration::from_secs(10));
        assert_eq!(s.modules[1].command, ["make", "check"]);
        assert_eq!(s.modules[1].time_limit, Duration::from_secs(120));
    }

    #[test]
    fn a_bad_manifest_is_an_error_naming_the_file_and_the_value() {
        let (_d, unknown) = suite("[baseline]\ncontext = \"base\"\ncontxt = 1\n", &[]);
        let e = unknown.expect_err("unknown field").to_string();
        assert!(e.contains("testgrid.toml") && e.contains("contxt"), "{e}");
        let (_d, both) = suite("[baseline]\ncontext = \"base\"\nfrom = \"x\"\nsetup = [\"true\"]\n", &[]);
        assert!(both.expect_err("both recipes").to_string().contains("not more than one"));
        let (_d, limit) = suite("[baseline]\ncontext = \"base\"\n", &[("m", Some("time_limit = \"soon\"\n"))]);
        let e = limit.expect_err("bad duration").to_string();
        assert!(e.contains("soon") && e.contains("test.toml"), "{e}");
        let (_d, name) = suite("[baseline]\ncontext = \"base\"\n", &[("bad name", None)]);
        assert!(name.expect_err("bad module name").to_string().contains("bad name"));
        let (_d, image_and_more) = suite("[baseline]\nimage = \"app:1\"\ncontext = \"base\"\n", &[]);
        assert!(image_and_more.expect_err("image with a context").to_string().contains("recipe of its own"));
        let (_d, image) = suite("[baseline]\nimage = \"app:1\"\n", &[]);
        assert_eq!(image.expect("an image recipe").baseline.recipe, Recipe::Image { image: "app:1".into() });
        let (_d, missing) = suite("[baseline]\ncontext = \"nowhere\"\n", &[]);
        assert!(missing.expect_err("no Dockerfile").to_string().contains("nowhere"));
    }
}
