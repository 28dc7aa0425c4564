use std::process::Command;

fn reaper(args: &[&str], config: &str) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("reaper-cfg-{:08x}", fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("reaper.toml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_reaper")).args(args).arg("--config").arg(&file).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

const CYCLE: &str = r#"
[providers.cloud]
type = "http"
base_url = "http://127.0.0.1:1"
[kinds.server]
provider = "cloud"
delete = "DELETE /servers/{id}"
after = ["vni"]
[kinds.vni]
provider = "cloud"
delete = "DELETE /vnis/{id}"
after = ["server"]
"#;

#[test]
fn a_cycle_in_the_config_stops_start_up_with_a_message_naming_it() {
    for cmd in ["run", "check-config"] {
        let out = reaper(&[cmd], CYCLE);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {stderr}");
        assert!(stderr.contains("kinds form a cycle through `after`: server -> vni -> server"), "{cmd}: {stderr}");
    }
}

#[test]
fn check_config_prints_the_order_of_a_valid_config() {
    let out = reaper(&["check-config"], include_str!("../../config/vpc-node.toml"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("bare_metal_server") && stdout.contains("after: vni, dns_record"), "{stdout}");
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_reaper"))
        .args(["check-config", "--config", "/nonexistent/reaper.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/reaper.toml does not exist"));
}
