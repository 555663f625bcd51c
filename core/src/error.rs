//! One error type for the host. Messages name the file, key, tensor or op at fault.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: key `{key}`: {msg}")]
    Config { file: PathBuf, key: String, msg: String },
    #[error("{file}: unsupported model_type `{model_type}`; supported: {supported}")]
    UnknownModelType { file: PathBuf, model_type: String, supported: String },
    #[error("{file}: {msg}")]
    BadFile { file: PathBuf, msg: String },
    #[error("tensor `{name}` not found in {where_}")]
    MissingTensor { name: String, where_: String },
    #[error("{file}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape { file: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{file}: tensor `{name}` has dtype {found}, expected {expected}")]
    TensorDtype { file: PathBuf, name: String, expected: String, found: String },
    #[error("shape error in {op} (node `{node}`): {msg}")]
    Shape { op: String, node: String, msg: String },
    #[error("{op}: {msg}")]
    Op { op: String, msg: String },
    #[error("input `{input}`: {msg}")]
    Input { input: String, msg: String },
    #[error("hub: {repo}: {file}: {msg}")]
    Hub { repo: String, file: String, msg: String },
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn op(op: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Op { op: op.into(), msg: msg.into() }
    }
    /// Names the node a shape error happened at, when it does not say yet.
    pub fn at_node(self, name: &str) -> Self {
        match self {
            Error::Shape { op, node, msg } if node.is_empty() => Error::Shape { op, node: name.into(), msg },
            e => e,
        }
    }
    pub fn config(file: impl Into<PathBuf>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { file: file.into(), key: key.into(), msg: msg.into() }
    }
}
