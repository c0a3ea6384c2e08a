//! MoltBot's one error-code vocabulary, mapped once to gRPC codes and HTTP statuses. Every boundary converts into
//! it: services return `tonic::Status` built from it, queue events carry its gRPC number, and the gateway turns
//! it into its HTTP answer.

/// What went wrong, by whose fault and what the caller can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is wrong: fix it (400).
    InvalidArgument,
    /// No such thing, or someone else's (404).
    NotFound,
    /// It exists already (409).
    AlreadyExists,
    /// Another operation holds what this one needs; retry later (409).
    Busy,
    /// Too much at once: retry after a pause (429).
    ResourceExhausted,
    /// A part of MoltBot is not reachable; retry (503).
    Unavailable,
    /// The request ran out of time (504).
    DeadlineExceeded,
    /// The caller went away (499).
    Cancelled,
    /// Missing or wrong credentials (401).
    Unauthenticated,
    /// Known, but not allowed (403).
    PermissionDenied,
    /// MoltBot's own failure (500).
    Internal,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [Self; 11] = [
        Self::InvalidArgument,
        Self::NotFound,
        Self::AlreadyExists,
        Self::Busy,
        Self::ResourceExhausted,
        Self::Unavailable,
        Self::DeadlineExceeded,
        Self::Cancelled,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::Internal,
    ];

    pub fn grpc(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::InvalidArgument => Code::InvalidArgument,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::Busy => Code::Aborted,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::Unavailable => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Cancelled => Code::Cancelled,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::Internal => Code::Internal,
        }
    }

    /// The code a gRPC status (or an error event's number) stands for.
    pub fn from_grpc(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => Self::InvalidArgument,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists => Self::AlreadyExists,
            Code::Aborted => Self::Busy,
            Code::ResourceExhausted => Self::ResourceExhausted,
            Code::Unavailable => Self::Unavailable,
            Code::DeadlineExceeded => Self::DeadlineExceeded,
            Code::Cancelled => Self::Cancelled,
            Code::Unauthenticated => Self::Unauthenticated,
            Code::PermissionDenied => Self::PermissionDenied,
            Code::Ok | Code::Unknown | Code::Unimplemented | Code::Internal | Code::DataLoss => Self::Internal,
        }
    }

    pub fn http(self) -> u16 {
        match self {
            Self::InvalidArgument => 400,
            Self::NotFound => 404,
            Self::AlreadyExists | Self::Busy => 409,
            Self::ResourceExhausted => 429,
            Self::Unavailable => 503,
            Self::DeadlineExceeded => 504,
            Self::Cancelled => 499,
            Self::Unauthenticated => 401,
            Self::PermissionDenied => 403,
            Self::Internal => 500,
        }
    }

    /// A gRPC status with this code.
    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        tonic::Status::new(self.grpc(), message)
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn every_code_survives_a_trip_through_grpc() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_grpc(code.grpc()), code);
            assert_eq!(ErrorCode::from_grpc(tonic::Code::from(code.grpc() as i32)), code, "as an event's number");
        }
    }
}
