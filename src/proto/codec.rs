//! The gRPC doors' codec: prost's, except that a request message that does not decode is the
//! sender's mistake, answered `INVALID_ARGUMENT` with a field violation naming the request,
//! where prost's codec answers `INTERNAL` (which tells a client the relay failed, and that a
//! retry may help).

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::error::ApiError;

/// [`ProstCodec`] with decoding errors answered as the sender's.
#[derive(Debug, Clone)]
pub struct DoorCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for DoorCodec<T, U> {
    fn default() -> Self {
        DoorCodec { _types: PhantomData }
    }
}

impl<T, U> Codec for DoorCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = DoorDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        DoorDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// [`ProstDecoder`], answering a message that does not decode with `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct DoorDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for DoorDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            if status.code() == tonic::Code::Internal {
                ApiError::field(
                    "request",
                    format!(
                        "is not a valid request message of this method: {}",
                        status.message()
                    ),
                )
                .into()
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
