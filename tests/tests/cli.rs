//! The command line itself: `gateway version`, and `--help` with examples on
//! every subcommand (found by walking the help output, so a subcommand
//! added without examples fails here).

use gateway_tests::gateway::run_cli;

/// `version = "..."` of `[workspace.package]` in the workspace Cargo.toml.
fn workspace_version() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let text = std::fs::read_to_string(root.join("Cargo.toml")).expect("read Cargo.toml");
    let section = text
        .split("[workspace.package]")
        .nth(1)
        .expect("a [workspace.package] section");
    section
        .lines()
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| {
            let v = l.strip_prefix("version")?.trim_start().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .expect("a version in [workspace.package]")
}

#[test]
fn version_prints_the_workspace_version() {
    let want = format!("gateway {}\n", workspace_version());
    let (code, out, err) = run_cli(&["version"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, want);
    // The clap flag says the same.
    let (code, out, err) = run_cli(&["--version"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, want);
}

/// The subcommands a `--help` text lists under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_command_has_help_with_examples() {
    let (code, top, err) = run_cli(&["--help"]);
    assert_eq!(code, 0, "{err}");
    let listed = subcommands(&top);
    // The commands the README documents are all there.
    for c in [
        "run", "check", "routes", "reload", "deny", "allow", "xdp", "version",
    ] {
        assert!(listed.iter().any(|l| l == c), "{c} missing from:\n{top}");
    }

    // Breadth first over the command tree; bounded by its depth.
    let mut level: Vec<Vec<String>> = vec![vec![]];
    let mut checked = 0;
    for _ in 0..4 {
        let mut next = Vec::new();
        for path in &level {
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.push("--help");
            let (code, out, err) = run_cli(&args);
            let name = format!("gateway {}", path.join(" ")).trim_end().to_string();
            assert_eq!(code, 0, "{name} --help: {err}");
            assert!(out.contains("Usage: "), "{name} --help:\n{out}");
            // An example section whose examples run this very command.
            let examples: Vec<&str> = out
                .lines()
                .skip_while(|l| *l != "Examples:")
                .skip(1)
                .take_while(|l| l.starts_with("  "))
                .map(str::trim)
                .collect();
            assert!(
                !examples.is_empty(),
                "{name} --help has no examples:\n{out}"
            );
            assert!(
                examples.iter().any(|e| e.starts_with(&name)),
                "no example of `{name}` in {examples:?}"
            );
            checked += 1;
            for sub in subcommands(&out) {
                let mut p = path.clone();
                p.push(sub);
                next.push(p);
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    assert!(
        level.iter().all(|p| p.len() < 4),
        "command tree deeper than expected"
    );
    // gateway, its 8 commands, and the 8 below deny, allow and xdp.
    assert!(checked >= 17, "only {checked} commands checked");
}
