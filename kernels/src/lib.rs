//! Math kernels. CPU kernels here are the reference every device kernel is checked against.

pub mod cpu;
pub mod cuda;
pub mod dense;
pub mod isa;
pub mod pool;
pub mod quant;
