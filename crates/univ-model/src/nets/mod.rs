//! Networks: the two backbones, the text-driven head, and the Universal Model around them.

pub mod head;
pub mod swin_unetr;
pub mod unet;
pub mod universal;

pub use head::{
    ControllerOutput, Encoding, HEAD_CHANNELS, HEAD_PARAMS, HIDDEN, TEXT_DIM, UniversalHead,
};
pub use swin_unetr::{SwinUnetr, SwinUnetrConfig, SwinUnetrParts};
pub use unet::{Unet3d, UnetConfig};
pub use universal::{Backbone, BackboneConfig, ForwardParts, UniversalConfig, UniversalModel};
