//! Checks a job request against the limits before anything reaches Prefect.

use crate::config::JobLimits;

/// A request that broke a limit. The message names the limit and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("invalid code: it is empty or only whitespace; send at least one line of Python")]
    EmptyCode,
    #[error(
        "invalid code: it is {length} characters long, over the limit of {max} characters; \
         send shorter code"
    )]
    CodeTooLong { length: usize, max: usize },
    #[error("invalid timeout_seconds {value}: the allowed range is {min}-{max} seconds")]
    TimeoutOutOfRange { value: i64, min: u64, max: u64 },
}

/// A validated job: code within the length limit and a timeout within the allowed range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    code: String,
    timeout_seconds: u64,
}

impl JobRequest {
    /// Validates `code` and `timeout_seconds`, using the default timeout when none is given.
    ///
    /// # Errors
    /// Returns [`InvalidRequest`] for empty or whitespace-only code, code longer than
    /// `limits.max_code_chars` characters, or a timeout outside the allowed range.
    pub fn new(
        code: String,
        timeout_seconds: Option<i64>,
        limits: &JobLimits,
    ) -> Result<Self, InvalidRequest> {
        if code.trim().is_empty() {
            return Err(InvalidRequest::EmptyCode);
        }
        let length = code.chars().count();
        if length > limits.max_code_chars {
            return Err(InvalidRequest::CodeTooLong { length, max: limits.max_code_chars });
        }
        let timeout_seconds = check_timeout(timeout_seconds, limits)?;
        Ok(Self { code, timeout_seconds })
    }

    /// Returns the Python source to run.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// Seconds the code may run before the flow kills it.
    pub fn timeout_seconds(&self) -> u64 {
        self.timeout_seconds
    }

    /// Code length in characters, as the limit counts it.
    pub fn code_length(&self) -> usize {
        self.code.chars().count()
    }
}

fn check_timeout(value: Option<i64>, limits: &JobLimits) -> Result<u64, InvalidRequest> {
    let Some(value) = value else {
        return Ok(limits.default_timeout_seconds);
    };
    let out_of_range = InvalidRequest::TimeoutOutOfRange {
        value,
        min: limits.min_timeout_seconds,
        max: limits.max_timeout_seconds,
    };
    let seconds = u64::try_from(value).map_err(|_| out_of_range.clone())?;
    if seconds < limits.min_timeout_seconds || seconds > limits.max_timeout_seconds {
        return Err(out_of_range);
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> JobLimits {
        JobLimits::default()
    }

    #[test]
    fn code_at_limit_is_accepted() {
        let request =
            JobRequest::new("x".repeat(50_000), None, &limits()).expect("50,000 characters are allowed");
        assert_eq!(request.code_length(), 50_000);
    }

    #[test]
    fn code_over_limit_names_limit() {
        let error = JobRequest::new("x".repeat(50_001), None, &limits()).unwrap_err();
        assert_eq!(error, InvalidRequest::CodeTooLong { length: 50_001, max: 50_000 });
        assert!(error.to_string().contains("limit of 50000 characters"), "{error}");
    }

    #[test]
    fn code_length_counts_characters_not_bytes() {
        let code = "é".repeat(50_000);
        assert!(code.len() > 50_000);
        assert!(JobRequest::new(code, None, &limits()).is_ok());
    }

    #[test]
    fn empty_and_blank_code_are_rejected() {
        for code in ["", "   ", "\n\t \n"] {
            let error = JobRequest::new(code.to_owned(), None, &limits()).unwrap_err();
            assert_eq!(error, InvalidRequest::EmptyCode, "code {code:?}");
        }
    }

    #[test]
    fn timeout_defaults_when_missing() {
        let request = JobRequest::new("print(1)".to_owned(), None, &limits()).unwrap();
        assert_eq!(request.timeout_seconds(), 120);
    }

    #[test]
    fn timeout_bounds_are_inclusive() {
        for value in [10, 600] {
            let request = JobRequest::new("print(1)".to_owned(), Some(value), &limits()).unwrap();
            assert_eq!(request.timeout_seconds(), value as u64);
        }
    }

    #[test]
    fn timeout_out_of_range_names_range() {
        for value in [9, 601, 0, -5] {
            let error = JobRequest::new("print(1)".to_owned(), Some(value), &limits()).unwrap_err();
            assert_eq!(error, InvalidRequest::TimeoutOutOfRange { value, min: 10, max: 600 });
            assert!(error.to_string().contains("10-600"), "{error}");
        }
    }
}
