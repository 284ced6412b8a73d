//! The progress bar every long loop of fr shows (training steps, images embedded).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` units labelled `prefix`, with elapsed time, position, a message (set with
/// [`ProgressBar::set_message`]) and the time left.
pub fn progress_bar(len: u64, prefix: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} (eta {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_prefix(prefix.to_string());
    pb
}
