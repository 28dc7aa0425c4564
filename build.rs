//! `sqlx::migrate!` embeds migrations/ at compile time; without this, a new
//! or changed migration alone would not rebuild the binary (sqlx's advice).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
