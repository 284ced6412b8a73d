//! The error of every workflow in this crate.
//!
//! A workflow touches every other crate, files, configs and processes, so [`Error`] wraps their
//! errors and adds what was being done when one happened ([`Context`], in the manner of
//! `anyhow::Context`): `Error::Context { context: "reading configs/arcface.toml", source }`.
//! `Display` shows the outermost message; [`std::error::Error::source`] walks the chain, so
//! `anyhow`'s `{:#}` or `{:?}` prints all of it.

use std::fmt::Display;

/// The result of a workflow.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Declares [`Error`]'s variants that wrap another error: `Display` and `source` pass
/// through to it (as thiserror's `transparent`), and `From` converts it for `?`.
macro_rules! wrapped_errors {
    ($($(#[$doc:meta])* $variant:ident($ty:ty),)*) => {
        /// What went wrong in a workflow, with the file, key, rank or step it concerns.
        ///
        /// `{}` shows the outermost message, `{:#}` the whole chain joined by `": "` (as
        /// `anyhow` does).
        #[derive(Debug)]
        pub enum Error {
            /// A message naming what failed (a config key, a file, a rank, a flag).
            Message(String),
            /// `source` happened while doing `context`.
            Context {
                /// What was being done ("reading configs/arcface.toml").
                context: String,
                /// What failed.
                source: Box<Error>,
            },
            $($(#[$doc])* $variant($ty),)*
        }

        impl Error {
            /// The other crate's error this one wraps, if it is one.
            fn wrapped(&self) -> Option<&(dyn std::error::Error + 'static)> {
                match self {
                    Error::Message(_) | Error::Context { .. } => None,
                    $(Error::$variant(e) => Some(e),)*
                }
            }
        }

        $(impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Error::$variant(e)
            }
        })*
    };
}

wrapped_errors! {
    /// Reading or writing a file, a socket or a process.
    Io(std::io::Error),
    /// JSON (metrics, summaries, model cards).
    Json(serde_json::Error),
    /// A TOML config that does not parse.
    TomlParse(toml::de::Error),
    /// A config that does not serialise to TOML.
    TomlWrite(toml::ser::Error),
    /// Formatting a report.
    Fmt(std::fmt::Error),
    /// A tensor operation.
    Candle(candle_core::Error),
    /// A host array of the wrong shape.
    Shape(ndarray::ShapeError),
    /// Encoding or decoding an image.
    Image(image::ImageError),
    /// A backbone or its weights.
    Backbone(fr_backbone::Error),
    /// A head.
    Head(fr_heads::Error),
    /// Data: RecordIO, .bin, image folders, IJB metadata, the loader.
    Data(fr_data::Error),
    /// A protocol or metric.
    Eval(fr_eval::EvalError),
    /// The trainer, checkpoints, distillation, inversion.
    Train(fr_train::Error),
    /// LH2Face's reconstruction branch.
    Render(fr_render::Error),
    /// Processes, rendezvous and collectives.
    Dist(fr_dist::Error),
}

impl Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self, self.wrapped()) {
            (Error::Message(m), _) => f.write_str(m)?,
            (Error::Context { context, .. }, _) => f.write_str(context)?,
            (_, Some(e)) => write!(f, "{e}")?,
            (_, None) => unreachable!("every other variant wraps an error"),
        }
        if f.alternate() {
            let mut next = std::error::Error::source(self);
            while let Some(e) = next {
                write!(f, ": {e}")?;
                next = e.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Context { source, .. } => Some(&**source),
            other => other.wrapped().and_then(|e| e.source()),
        }
    }
}

impl Error {
    /// An error with this message.
    pub fn msg(message: impl Display) -> Self {
        Error::Message(message.to_string())
    }

    /// This error with `context` around it.
    pub fn context(self, context: impl Display) -> Self {
        Error::Context {
            context: context.to_string(),
            source: Box::new(self),
        }
    }
}

impl From<std::convert::Infallible> for Error {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}

/// Adds what was being done to an error (`anyhow::Context` for [`Error`]).
pub trait Context<T> {
    /// Wraps the error with `context`.
    ///
    /// # Errors
    /// The original error, wrapped.
    fn context<C: Display>(self, context: C) -> Result<T>;

    /// Wraps the error with the context `f` builds (only called on an error).
    ///
    /// # Errors
    /// The original error, wrapped.
    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context<C: Display>(self, context: C) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }

    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context<C: Display>(self, context: C) -> Result<T> {
        self.ok_or_else(|| Error::msg(context))
    }

    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.ok_or_else(|| Error::msg(f()))
    }
}

/// Returns early with an [`Error::Message`] formatted as `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return ::std::result::Result::Err($crate::Error::msg(::std::format!($($arg)*)))
    };
}

/// An [`Error::Message`] formatted as `format!`.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => {
        $crate::Error::msg(::std::format!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_chains_and_shows_the_outermost_message() {
        let inner: std::result::Result<(), std::io::Error> = Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file",
        ));
        let e = inner.context("reading a.toml").unwrap_err();
        assert_eq!(e.to_string(), "reading a.toml");
        let source = std::error::Error::source(&e).expect("a source");
        assert_eq!(source.to_string(), "no such file");
        assert_eq!(format!("{e:#}"), "reading a.toml: no such file");
        let outer = Err::<(), _>(e).context("loading the preset").unwrap_err();
        assert_eq!(
            format!("{outer:#}"),
            "loading the preset: reading a.toml: no such file"
        );
        let none: Option<u8> = None;
        assert_eq!(
            none.context("missing key").unwrap_err().to_string(),
            "missing key"
        );
    }
}
