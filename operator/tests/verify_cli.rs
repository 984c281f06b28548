//! `cutover verify` as a person runs it: exit codes, text and JSON output, connection strings
//! from the environment, and an unreachable side reported without its password.

use std::process::{Command, Output};

use cutover_tests::BlueGreen;

fn cutover(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cutover"))
        .arg("verify")
        .args(args)
        .envs(env.iter().copied())
        .env_remove("CUTOVER_SOURCE_DSN")
        .env_remove("CUTOVER_TARGET_DSN")
        .output()
        .expect("running cutover verify")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn exit_codes_and_outputs() {
    let bg = BlueGreen::start().unwrap();
    let setup = "CREATE TABLE orders (id int PRIMARY KEY, item text);
                 INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 300) g;";
    bg.blue.execute("app", setup).unwrap();
    bg.green.execute("app", setup).unwrap();
    let (blue, green) = (bg.blue_dsn(), bg.green_dsn());
    let env = [("SRC", blue.as_str()), ("DST", green.as_str())];

    // Equal: exit 0, JSON on stdout, nothing on stderr (not a terminal: no progress).
    let out = cutover(
        &[
            "--source-env",
            "SRC",
            "--target-env",
            "DST",
            "--output",
            "json",
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["matched"], true);
    assert_eq!(json["source_rows"], 300);
    assert_eq!(json["tables"][0]["table"]["name"], "orders");
    assert_eq!(json["tables"][0]["method"], "chunked");
    assert_eq!(text(&out.stderr), "");

    // Different: exit 1, the table and the mismatch list.
    bg.green
        .execute(
            "app",
            "UPDATE orders SET item = 'changed' WHERE id = 5; DELETE FROM orders WHERE id = 250;",
        )
        .unwrap();
    let out = cutover(
        &[
            "--source",
            &blue,
            "--target-env",
            "DST",
            "--chunk-rows",
            "40",
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("public.orders"), "{stdout}");
    assert!(stdout.contains("MISMATCH: 2 differences"), "{stdout}");
    assert!(
        stdout.contains("table public.orders: changed: id=5"),
        "{stdout}"
    );
    assert!(
        stdout.contains("table public.orders: missing on target: id=250"),
        "{stdout}"
    );
    assert!(stdout.contains("rows/s"), "{stdout}");
    let out = cutover(
        &[
            "--source-env",
            "SRC",
            "--target-env",
            "DST",
            "--output",
            "json",
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["tables"][0]["differences"][0]["kind"], "changed",
        "{json:#}"
    );
    assert_eq!(json["tables"][0]["differences"][0]["key"]["values"][0], "5");

    // Unreachable: exit 2, a clear error naming the server but not the password.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let unreachable = format!("postgres://postgres:s3cret-pw@127.0.0.1:{port}/app");
    let out = cutover(&["--source-env", "SRC", "--target", &unreachable], &env);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "error: failed to connect to the target database: failed to connect to postgres://postgres@127.0.0.1:{port}/app"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
    assert!(out.stdout.is_empty());

    // A variable that is not set.
    let out = cutover(
        &["--source-env", "NOPE_NOT_SET", "--target-env", "DST"],
        &env,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("environment variable NOPE_NOT_SET is not set"),
        "{}",
        text(&out.stderr)
    );
}
