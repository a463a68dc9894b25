//! The command line as a user meets it, without privileges: bad configuration is refused before
//! anything touches the kernel, with the field and the reason.
use std::process::Command;

fn agent(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(args)
        .env_remove("MESH_CONFIG")
        .output()
        .expect("run mesh-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_with_a_bad_flag_exits_non_zero_naming_the_field() {
    let (code, _, err) = agent(&["run", "--capture", "10.0.0.0/40=80", "--fail-mode", "maybe"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--capture[0]: \"10.0.0.0/40\": prefix length must be 0-32"),
        "{err}"
    );
    assert!(
        err.contains("fail_mode: \"maybe\" is not a fail mode"),
        "{err}"
    );
}

#[test]
fn run_with_a_bad_file_names_file_field_and_reason() {
    let dir = std::env::temp_dir().join(format!("mesh-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let f = dir.join("agent.yaml");
    std::fs::write(
        &f,
        "interfaces: [h1]\ncapture:\n- prefix: 10.96.0.0/16\n  ports: [\"9000-80\"]\n",
    )
    .expect("write");
    let (code, _, err) = agent(&["run", "--config", f.to_str().expect("utf8")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("capture[0].ports[0]: \"9000-80\": the range is empty (9000 > 80)"),
        "{err}"
    );

    std::fs::write(&f, "interfaces: [h1]\nlisten_prot: 1\n").expect("write");
    let (code, _, err) = agent(&["check", "--config", f.to_str().expect("utf8")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("agent.yaml") && err.contains("listen_prot"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn environment_variables_are_read() {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["check"])
        .env("MESH_INTERFACES", "h1,h2")
        .env("MESH_CAPTURE", "10.96.0.0/16=80;fd00::/64=*")
        .env("MESH_FAIL_MODE", "closed")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("2 interface(s), 2 capture rule(s), fail mode closed"),
        "{stdout}"
    );
}
