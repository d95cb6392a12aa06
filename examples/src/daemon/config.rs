//! One way to configure every daemon: flags, environment variables and a TOML file, all
//! with the same names, in that order of precedence (a flag beats its variable, which
//! beats the file, which beats the built-in default).
//!
//! - Every long flag `--some-flag` of binary `bin` is also read from
//!   `KEELSON_<BIN>_SOME_FLAG` (`bin` upper-cased, `-` as `_`), unless the flag names a
//!   variable of its own (the etcd flags share `KEELSON_ETCD_*` across binaries).
//! - `--config FILE` (or `KEELSON_<BIN>_CONFIG`) reads a TOML file whose keys are the
//!   long flag names: `listen = "127.0.0.1:8080"`, `upstream-timeout = "30s"`,
//!   `cert = ["a.example=a.pem,a.key"]` for a repeatable flag, `tcp-copy = true` for a
//!   switch. The file is strict: a key that names no flag is an error that names the key.
//!
//! The file's values reach clap as environment values of the process (only where the
//! variable is not set already), so they are parsed and validated exactly as a flag
//! would be and count toward `required` flags. A repeatable flag without a delimiter
//! (whose variable could carry one value only) gets the file's list as flags instead,
//! unless the command line or its variable gives it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::{ArgAction, Command};

/// The common flags every daemon flattens into its own.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// A TOML file of settings named as the long flags (`listen = "127.0.0.1:8080"`);
    /// flags and environment variables override it.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Log line format on stderr: `text` (colour only on a terminal) or `json` (one
    /// object per line).
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub log_format: super::LogFormat,
    /// Which events to log: a level (`info`, `debug`) or `tracing` directives
    /// (`info,keelson_routing=debug`).
    #[arg(long, default_value = "info", global = true)]
    pub log_level: String,
    /// Print a completion script for this shell and exit.
    #[arg(long, value_name = "SHELL", global = true)]
    pub completions: Option<clap_complete::Shell>,
    /// Check the flags, environment and config file, print the settings they resolve
    /// to, and exit (0 when they parse).
    #[arg(long, global = true)]
    pub check_config: bool,
}

/// The environment variable of `flag` (a long name) for `binary`.
pub fn env_name(binary: &str, flag: &str) -> String {
    format!("KEELSON_{}_{}", binary.to_uppercase(), flag.to_uppercase()).replace('-', "_")
}

/// Parses the process's arguments for `binary` with its environment variables and
/// config file; prints usage errors and completion scripts and exits as clap does.
pub fn parse<T: clap::Parser + std::fmt::Debug>(binary: &str) -> T {
    match try_parse_from::<T>(binary, std::env::args_os()) {
        Ok(Parsed::Args(args)) => args,
        Ok(Parsed::Completions(text)) | Ok(Parsed::Checked(text)) => {
            print!("{text}");
            std::process::exit(0)
        }
        Err(e) => e.exit(),
    }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Parsed<T> {
    /// Run with these arguments.
    Args(T),
    /// Print this completion script.
    Completions(String),
    /// `--check-config`: print these settings and exit.
    Checked(String),
}

/// [`parse`] over given arguments (the first is the program name), for tests. Sets the
/// variables of the config file's values in this process's environment.
pub fn try_parse_from<T: clap::Parser + std::fmt::Debug>(
    binary: &str,
    args: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<Parsed<T>, clap::Error> {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let shape = T::command().name(binary.to_owned());
    if let Some(shell) = flag_value(&args, "completions") {
        let shell: clap_complete::Shell = shell
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| clap::Error::raw(ErrorKind::InvalidValue, format!("--completions {shell:?}: not a shell clap knows\n")))?;
        let mut cmd = with_env_names(shape, binary);
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, binary.to_owned(), &mut script);
        return Ok(Parsed::Completions(String::from_utf8_lossy(&script).into_owned()));
    }
    let file = flag_value(&args, "config").or_else(|| std::env::var_os(env_name(binary, "config")));
    let mut list_defaults = Vec::new();
    if let Some(file) = file {
        let path = PathBuf::from(file);
        list_defaults = apply_file(&shape, subcommand(&shape, &args), binary, &path)?;
    }
    // Built again: clap reads each variable when the argument is defined.
    let cmd = with_env_names(T::command().name(binary.to_owned()), binary);
    let args = with_lists(args, list_defaults);
    let matches = cmd.try_get_matches_from(args)?;
    let parsed = T::from_arg_matches(&matches)?;
    if matches.get_flag("check_config") {
        // Paths and settings only: secrets come from files and variables never parsed here.
        return Ok(Parsed::Checked(format!("{parsed:#?}\n")));
    }
    Ok(Parsed::Args(parsed))
}

/// `args` with the file's lists of repeatable flags put in as flags (right after the
/// program, or after the subcommand they belong to), each unless the command line gives
/// that flag itself: a flag's values replace the file's list.
fn with_lists(mut args: Vec<OsString>, lists: Vec<ListDefault>) -> Vec<OsString> {
    for (sub, long, values) in lists.into_iter().rev() {
        let flag = format!("--{long}");
        let given = args.iter().any(|a| a.to_str().is_some_and(|a| a == flag || a.starts_with(&format!("{flag}="))));
        if given {
            continue;
        }
        let at = match &sub {
            None => 1,
            Some(sub) => match args.iter().position(|a| a == sub.as_str()) {
                Some(i) => i + 1,
                None => continue,
            },
        };
        let inserted: Vec<OsString> = values.into_iter().map(|v| OsString::from(format!("{flag}={v}"))).collect();
        args.splice(at..at, inserted);
    }
    args
}

/// The subcommand `args` invoke (the first argument naming one), if any.
fn subcommand<'c>(cmd: &'c Command, args: &[OsString]) -> Option<&'c Command> {
    args.iter().skip(1).find_map(|a| cmd.find_subcommand(a.to_str()?))
}

/// Gives every long flag without a variable of its own `KEELSON_<BIN>_<FLAG>`, in
/// subcommands too.
fn with_env_names(cmd: Command, binary: &str) -> Command {
    let subs: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_owned()).collect();
    let cmd = subs.into_iter().fold(cmd, |cmd, sub| cmd.mut_subcommand(sub, |sc| with_env_names(sc, binary)));
    let flags: Vec<(String, String)> = cmd
        .get_arguments()
        .filter(|a| a.get_env().is_none() && !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
        .filter_map(|a| Some((a.get_id().to_string(), a.get_long()?.to_owned())))
        .collect();
    flags.into_iter().fold(cmd, |cmd, (id, long)| {
        let name = env_name(binary, &long);
        cmd.mut_arg(id, |a| a.env(name))
    })
}

/// The value of `--name VALUE` or `--name=VALUE` among `args`, before any `--`.
fn flag_value(args: &[OsString], name: &str) -> Option<OsString> {
    let flag = format!("--{name}");
    let with_eq = format!("--{name}=");
    let mut iter = args.iter().skip(1).take_while(|a| *a != "--");
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy();
        if text == flag {
            return iter.next().cloned();
        }
        if let Some(value) = text.strip_prefix(&with_eq) {
            return Some(value.into());
        }
    }
    None
}

/// A repeatable flag's values from the file: (subcommand, long name, values).
type ListDefault = (Option<String>, String, Vec<String>);

/// Reads the config file, whose keys are flags of `cmd` or of the subcommand `sub`
/// invoked: its scalar values (and lists of flags with a delimiter) go into the
/// environment where their variable is unset; returns the lists of the other repeatable
/// flags, to become their defaults.
fn apply_file(cmd: &Command, sub: Option<&Command>, binary: &str, path: &Path) -> Result<Vec<ListDefault>, clap::Error> {
    let bad = |msg: String| clap::Error::raw(ErrorKind::InvalidValue, format!("config file {}: {msg}\n", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| bad(e.message().to_owned()))?;
    let mut lists = Vec::new();
    let named = |c: &'_ Command, key: &str| {
        c.get_arguments().find(|a| a.get_long() == Some(key) && !matches!(a.get_action(), ArgAction::Help | ArgAction::Version)).cloned()
    };
    for (key, value) in table {
        let (owner, arg) = match (named(cmd, &key), sub.and_then(|s| named(s, &key))) {
            (Some(arg), _) => (None, arg),
            (None, Some(arg)) => (sub.map(|s| s.get_name().to_owned()), arg),
            (None, None) => return Err(bad(format!("unknown key `{key}`: {binary} has no --{key}"))),
        };
        if key == "config" || key == "completions" {
            return Err(bad(format!("`{key}` cannot be set in a config file")));
        }
        let values = match value {
            toml::Value::Array(items) => items.into_iter().map(|v| scalar(&key, v).map_err(&bad)).collect::<Result<Vec<_>, _>>()?,
            other => vec![scalar(&key, other).map_err(&bad)?],
        };
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        if values.len() != 1 && !repeatable {
            return Err(bad(format!("`{key}` takes one value, not a list")));
        }
        let variable = arg.get_env().map(|e| e.to_owned()).unwrap_or_else(|| env_name(binary, &key).into());
        if std::env::var_os(&variable).is_some() {
            continue; // the environment beats the file
        }
        match arg.get_value_delimiter() {
            Some(delimiter) => std::env::set_var(&variable, values.join(&delimiter.to_string())),
            None if repeatable => lists.push((owner, key.clone(), values)),
            None => std::env::set_var(&variable, &values[0]),
        }
    }
    Ok(lists)
}

/// A TOML value as the text a flag would carry.
fn scalar(key: &str, value: toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => Err(format!("`{key}`: expected a string, number or boolean")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Tool {
        #[command(subcommand)]
        command: Sub,
        #[command(flatten)]
        daemon: DaemonArgs,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Serve {
            #[arg(long)]
            root: String,
            #[arg(long)]
            insecure: bool,
            #[arg(long)]
            peer: Vec<String>,
        },
    }

    fn parse(binary: &str, file: &str, args: &[&str]) -> Result<Tool, clap::Error> {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).expect("write");
        let mut argv = vec![binary.to_owned()];
        argv.extend(args.iter().map(|a| a.to_string()));
        argv.extend(["--config".to_owned(), path.display().to_string()]);
        match try_parse_from::<Tool>(binary, argv)? {
            Parsed::Args(t) => Ok(t),
            other => panic!("neither completions nor a check asked for: {other:?}"),
        }
    }

    // Each test its own binary name: the file's values land in the process environment.
    #[test]
    fn a_subcommands_flags_come_from_the_file_and_flags_replace_its_lists() {
        let t = parse("cfgtest-a", "root = \"/srv\"\ninsecure = true\npeer = [\"a\", \"b\"]\nlog-level = \"debug\"\n", &["serve"])
            .expect("parses");
        let Sub::Serve { root, insecure, peer } = t.command;
        assert_eq!((root.as_str(), insecure, peer), ("/srv", true, vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(t.daemon.log_level, "debug");
        let t = parse("cfgtest-b", "root = \"/srv\"\npeer = [\"a\", \"b\"]\n", &["serve", "--peer", "c"]).expect("parses");
        let Sub::Serve { peer, .. } = t.command;
        assert_eq!(peer, vec!["c".to_owned()], "flags replace the file's list");
    }

    #[test]
    fn unknown_and_reserved_keys_are_refused_by_name() {
        let e = parse("cfgtest-c", "rooot = \"/srv\"\n", &["serve"]).expect_err("a typo");
        assert!(e.to_string().contains("unknown key `rooot`") && e.to_string().contains("cfgtest-c has no --rooot"), "{e}");
        let e = parse("cfgtest-d", "config = \"other.toml\"\n", &["serve", "--root", "/x"]).expect_err("reserved");
        assert!(e.to_string().contains("`config` cannot be set in a config file"), "{e}");
        let e = parse("cfgtest-e", "[serve]\nroot = \"/srv\"\n", &["serve"]).expect_err("a table");
        assert!(e.to_string().contains("unknown key `serve`"), "{e}");
    }

    #[test]
    fn variable_names_follow_the_binary_and_the_flag() {
        assert_eq!(env_name("node-agent", "metrics-listen"), "KEELSON_NODE_AGENT_METRICS_LISTEN");
    }
}
