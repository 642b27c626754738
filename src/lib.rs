//! tensor-peft
pub use tensor_peft_adapters as adapters;
