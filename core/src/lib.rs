//! The autodeploy host: graph IR, op rules and CPU implementations, tensors, weights, config,
//! model sources and the plugin registry.

pub mod backend;
pub mod comm;
pub mod config;
pub mod cpu;
pub mod custom_op;
pub mod device_attention;
pub mod dtype;
pub mod engine_core;
pub mod error;
pub mod gguf;
pub mod hub;
pub mod interp;
pub mod ir;
pub mod kvcache;
pub mod mutation;
pub mod op_text;
pub mod ops;
pub mod pattern;
pub mod pipeline;
pub mod plugin_abi;
pub mod prefix_cache;
pub mod pt2;
pub mod quant;
pub mod registry;
pub mod runtime;
pub mod sampling;
pub mod shape;
pub mod tensor;
pub mod tokenizer;
pub mod transform;
pub mod weights;

pub use dtype::DType;
pub use error::{Error, Result};
pub use ir::{Graph, GraphBuilder, TensorMeta, ValueId};
pub use ops::Op;
pub use shape::{Dim, Shape, SizeArg};
pub use tensor::Tensor;

/// Re-exported so plugin crates register with the same `inventory` the host collects from.
pub use inventory;
