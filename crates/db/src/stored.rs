//! Enums stored as text columns: [`stored_enum!`] declares one with its stored values and gives
//! it `ALL`, `as_str`, `Display` and `FromStr` (failing with [`UnknownValue`], which converts to
//! a `DbErr` for reading rows).

/// A string that is not one of an enum's stored values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`")]
pub struct UnknownValue {
    /// The enum, e.g. `SendState`.
    pub what: &'static str,
    pub value: String,
}

impl From<UnknownValue> for sea_orm::DbErr {
    fn from(e: UnknownValue) -> Self {
        sea_orm::DbErr::Type(e.to_string())
    }
}

/// Declares an enum whose variants are stored as the given strings:
///
/// ```ignore
/// stored_enum! {
///     /// Docs.
///     #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
///     pub enum Colour {
///         /// Docs.
///         Red = "red",
///         Green = "green",
///     }
/// }
/// ```
macro_rules! stored_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$variant_meta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];

            /// The stored value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text ),+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| $crate::UnknownValue { what: stringify!($name), value: s.to_owned() })
            }
        }
    };
}

#[cfg(test)]
mod tests {
    stored_enum! {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Colour {
            Red = "red",
            DarkGreen = "dark_green",
        }
    }

    #[test]
    fn values_round_trip_and_strangers_are_named() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::DarkGreen]);
        for c in Colour::ALL {
            assert_eq!(c.as_str().parse::<Colour>(), Ok(c));
            assert_eq!(c.to_string(), c.as_str());
        }
        let err = "green"
            .parse::<Colour>()
            .err()
            .map(|e| sea_orm::DbErr::from(e).to_string());
        assert!(err.is_some_and(|e| e.contains("unknown Colour `green`")));
    }
}
