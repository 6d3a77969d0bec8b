//! What a new Single Event Tag may be, as X's `POST .../web_event_tags` takes it: a name, one of X's types,
//! a click window of 1, 7, 14 or 30 days (30 unless said) and a view-through window of 0, 1, 7, 14 or 30
//! days (1 unless said) no longer than the click window. Pure: `events create` checks its flags with it
//! before anything is sent, and the fake of X answers a bad parameter with it.

/// X's tag types.
pub const TAG_TYPES: [&str; 14] = [
    "ADDED_PAYMENT_INFO",
    "ADD_TO_CART",
    "ADD_TO_WISHLIST",
    "CHECKOUT_INITIATED",
    "CONTENT_VIEW",
    "CUSTOM",
    "DOWNLOAD",
    "PRODUCT_CUSTOMIZATION",
    "PURCHASE",
    "SEARCH",
    "SIGN_UP",
    "SITE_VISIT",
    "START_TRIAL",
    "SUBSCRIBE",
];

pub const CLICK_WINDOWS: [u32; 4] = [1, 7, 14, 30];
pub const VIEW_THROUGH_WINDOWS: [u32; 5] = [0, 1, 7, 14, 30];
pub const DEFAULT_CLICK_WINDOW: u32 = 30;
pub const DEFAULT_VIEW_THROUGH_WINDOW: u32 = 1;

/// A tag to create, every parameter checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagSpec {
    pub name: String,
    pub kind: String,
    pub click_window: u32,
    pub view_through_window: u32,
}

/// A parameter X would refuse, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// X's parameter name: `name`, `type`, `click_window` or `view_through_window`.
    pub parameter: &'static str,
    pub message: String,
}

impl TagSpec {
    /// Checks the parameters as given (`None`: not given); windows are text as a query or form carries them.
    pub fn new(
        name: Option<&str>,
        kind: Option<&str>,
        click_window: Option<&str>,
        view_through_window: Option<&str>,
    ) -> Result<TagSpec, SpecError> {
        let bad = |parameter: &'static str, message: String| SpecError { parameter, message };
        let name = match name.map(str::trim) {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => return Err(bad("name", "name is required".into())),
        };
        let kind = match kind {
            Some(t) if TAG_TYPES.contains(&t) => t.to_owned(),
            Some(t) => {
                return Err(bad(
                    "type",
                    format!(
                        "{t:?} is not a valid type; expected one of {}",
                        TAG_TYPES.join(", ")
                    ),
                ))
            }
            None => return Err(bad("type", "type is required".into())),
        };
        let window =
            |parameter: &'static str, allowed: &[u32], given: Option<&str>, default| match given {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| allowed.contains(n))
                    .ok_or_else(|| {
                        bad(
                            parameter,
                            format!("{parameter} must be one of {allowed:?} (days), not {v:?}"),
                        )
                    }),
            };
        let click_window = window(
            "click_window",
            &CLICK_WINDOWS,
            click_window,
            DEFAULT_CLICK_WINDOW,
        )?;
        let view_through_window = window(
            "view_through_window",
            &VIEW_THROUGH_WINDOWS,
            view_through_window,
            DEFAULT_VIEW_THROUGH_WINDOW,
        )?;
        if view_through_window > click_window {
            return Err(bad(
                "view_through_window",
                format!("view_through_window ({view_through_window}) must be at most click_window ({click_window})"),
            ));
        }
        Ok(TagSpec {
            name,
            kind,
            click_window,
            view_through_window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn defaults_and_refusals_follow_xs_reference() {
        let spec = TagSpec::new(Some(" purchase "), Some("PURCHASE"), None, None).unwrap();
        assert_eq!(
            (
                spec.name.as_str(),
                spec.click_window,
                spec.view_through_window
            ),
            ("purchase", 30, 1)
        );
        let err = |r: Result<TagSpec, SpecError>| r.unwrap_err().parameter;
        assert_eq!(
            err(TagSpec::new(None, Some("PURCHASE"), None, None)),
            "name"
        );
        assert_eq!(
            err(TagSpec::new(Some("n"), Some("purchase"), None, None)),
            "type"
        );
        assert_eq!(err(TagSpec::new(Some("n"), None, None, None)), "type");
        assert_eq!(
            err(TagSpec::new(Some("n"), Some("SEARCH"), Some("3"), None)),
            "click_window"
        );
        assert!(
            TagSpec::new(Some("n"), Some("SEARCH"), Some("1"), None).is_ok(),
            "the default view-through window (1) fits a click window of 1"
        );
        assert_eq!(
            err(TagSpec::new(
                Some("n"),
                Some("SEARCH"),
                Some("1"),
                Some("7")
            )),
            "view_through_window"
        );
    }

    proptest! {
        /// A spec is made exactly when every window is one of X's and the view-through fits the click.
        #[test]
        fn windows_are_taken_exactly_when_x_takes_them(click in 0u32..40, view in 0u32..40) {
            let made = TagSpec::new(Some("n"), Some("CUSTOM"), Some(&click.to_string()), Some(&view.to_string()));
            let allowed = CLICK_WINDOWS.contains(&click) && VIEW_THROUGH_WINDOWS.contains(&view) && view <= click;
            prop_assert_eq!(made.is_ok(), allowed);
        }
    }
}
