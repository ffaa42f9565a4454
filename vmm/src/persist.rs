//! The contract every stateful device keeps with snapshots, in Firecracker's shape:
//! [`Persist::save`] turns the live device into plain serde facts, [`Persist::restore`] builds
//! it again from those facts plus the live things that cannot be saved and are handed in
//! (guest memory, file descriptors, paths). A new device implements it, and the snapshot tree
//! has one place for its state; the wiring that saves devices matches on every kind, so a
//! device without it does not compile in.
//!
//! It owns only the trait (and, for tests, the round-trip check). It never touches files or KVM.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Saving and restoring one piece of VM state.
pub trait Persist: Sized {
    /// What a snapshot keeps: plain facts, no handles.
    type State: Serialize + DeserializeOwned;
    /// The live things a restore needs handed in.
    type ConstructorArgs;
    /// Why a restore was refused.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The state to keep (the device should be quiet: the VM paused).
    fn save(&self) -> Self::State;

    /// The device again, from `state` and the live `args`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Test support: the round trip every device's persist test makes.
#[cfg(test)]
pub(crate) mod test_util {
    use super::Persist;

    /// Saves `device`, passes the state through the snapshot's encoding (postcard bytes),
    /// restores it with `args`, and checks that the restored device saves the same state.
    /// Returns the restored device, for the caller to check that it still behaves.
    pub(crate) fn round_trip<T>(device: &T, args: T::ConstructorArgs) -> T
    where
        T: Persist,
        T::State: PartialEq + std::fmt::Debug,
    {
        let saved = device.save();
        let bytes = postcard::to_stdvec(&saved).expect("encode the state");
        let decoded: T::State = postcard::from_bytes(&bytes).expect("decode the state");
        assert_eq!(decoded, saved, "the state survives its encoding");
        let restored = T::restore(args, &decoded).expect("restore");
        assert_eq!(restored.save(), saved, "save -> restore -> save differs");
        restored
    }
}
