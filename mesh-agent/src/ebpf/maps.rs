//! Typed access to the object's maps by their `mesh_common` names, with one error shape.
use aya::{Ebpf, maps::MapError};

use super::Error;

/// `name`'s map, read-only, as `T` (`Array`, `LpmTrie`, ...).
pub fn get<'a, T>(bpf: &'a Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<&'a aya::maps::Map, Error = MapError>,
{
    T::try_from(bpf.map(name).ok_or(Error::MissingMap(name))?).map_err(err(name))
}

/// `name`'s map, writable, as `T`.
pub fn get_mut<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    T::try_from(bpf.map_mut(name).ok_or(Error::MissingMap(name))?).map_err(err(name))
}

/// Wraps an aya map error with the map's name.
pub fn err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, source }
}
