//! Networks: the backbones and the Universal Model around them.

pub mod swin_unetr;
pub mod unet;
pub mod universal;

pub use swin_unetr::{SwinUnetr, SwinUnetrConfig, SwinUnetrParts};
pub use unet::{Unet3d, UnetConfig};
pub use universal::{
    BackboneConfig, Encoding, ForwardParts, UniversalConfig, UniversalModel, dynamic_head,
};
