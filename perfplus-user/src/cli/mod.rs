//! The operator's side: the control client that talks to agents, `perfplus node drain`, and `perfplus
//! track`'s measuring and printing. The `perfplus` binary (`src/main.rs`) parses the command line and calls into here.
pub mod client;
pub mod console;
pub mod drain;
pub mod pki;
pub mod track;

/// `30ms`, `0.5s`, `30` (milliseconds), `0` → milliseconds.
pub fn parse_ms(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30ms or 0.5s"))?;
    if !(value >= 0.0 && value.is_finite()) {
        return Err(format!("{text:?}: the duration must not be negative"));
    }
    Ok(value * scale)
}
