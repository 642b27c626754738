//! The registry macro: from one line per method (in `methods/mod.rs`) it generates the enums
//! Burn's `Module` derive needs ([`LinearAdapter`](crate::LinearAdapter),
//! [`ResidualAdapter`](crate::ResidualAdapter)), the model-level [`SharedFactors`](crate::SharedFactors),
//! [`MethodConfig`](crate::MethodConfig) with its name lookup and serde form, and the dispatch
//! from each enum to the method's own code.

/// Generates the method enums and their dispatch. A line is `linear Variant(ConfigType);`,
/// `linear Variant(ConfigType) shared field: FieldType;` or `residual Variant(ConfigType);`, where
/// `Variant` is also the name of the method's layer type and `field` the place of its shared
/// factors in `SharedFactors`. Names are listed in line order. A line may carry attributes (a
/// `#[cfg(…)]`), applied to everything generated for it except its shared-factor field, so a
/// conditional method has no shared factors.
macro_rules! registry {
    // Sorts the lines into linear and residual methods; `all` keeps the registry's order.
    (@sort [$($lin:tt)*] [$($res:tt)*] [$($all:tt)*]) => {
        $crate::registry::registry!(@emit [$($lin)*] [$($res)*] [$($all)*]);
    };
    (@sort [$($lin:tt)*] [$($res:tt)*] [$($all:tt)*]
        $(#[$a:meta])* linear $v:ident($c:ident) $(shared $f:ident: $s:ty)?; $($rest:tt)*) => {
        $crate::registry::registry!(@sort
            [$($lin)* ($(#[$a])* $v $c $(shared $f: $s)?)] [$($res)*] [$($all)* ($(#[$a])* $v $c)] $($rest)*);
    };
    (@sort [$($lin:tt)*] [$($res:tt)*] [$($all:tt)*] $(#[$a:meta])* residual $v:ident($c:ident); $($rest:tt)*) => {
        $crate::registry::registry!(@sort
            [$($lin)*] [$($res)* ($(#[$a])* $v $c)] [$($all)* ($(#[$a])* $v $c)] $($rest)*);
    };
    (@emit
        [$(($(#[$la:meta])* $lin:ident $lin_config:ident $(shared $lin_field:ident: $lin_shared:ty)?))*]
        [$(($(#[$ra:meta])* $res:ident $res_config:ident))*]
        [$(($(#[$aa:meta])* $any:ident $any_config:ident))*]
    ) => {
        /// Any adapter method with its hyper-parameters (serialised as the configuration's fields
        /// plus a `"method"` key holding its name).
        #[derive(Debug, Clone)]
        pub enum MethodConfig {
            $(
                #[doc = concat!("[`", stringify!($any_config), "`].")]
                $(#[$aa])*
                $any($any_config),
            )*
        }

        // A line's kind and its method's own answer agree.
        $($(#[$la])* const _: () = assert!(!<$lin_config as $crate::Method>::RESIDUAL, "registered as linear");)*
        $($(#[$ra])* const _: () = assert!(<$res_config as $crate::Method>::RESIDUAL, "registered as residual");)*

        /// Method names accepted by [`MethodConfig::from_name`], in registry order.
        pub const METHOD_NAMES: &[&str] = &[$($(#[$aa])* <$any_config as $crate::Method>::NAME,)*];

        /// Calls `$body` with `$config` bound to the method's configuration and `$M` to its type.
        macro_rules! with_method {
            ($self:expr, $config:ident: $M:ident => $body:expr) => {
                match $self {
                    $($(#[$aa])* MethodConfig::$any($config) => { #[allow(dead_code)] type $M = $any_config; $body })*
                }
            };
        }

        impl MethodConfig {
            /// The default configuration of the method called `name`.
            pub fn from_name(name: &str) -> $crate::Result<Self> {
                $(
                    $(#[$aa])*
                    if name == <$any_config as $crate::Method>::NAME {
                        return Ok(MethodConfig::$any(<$any_config>::new()));
                    }
                )*
                Err($crate::error::invalid("method", name, format!("expected one of {}", METHOD_NAMES.join(", "))))
            }

            /// The method's name (as in [`METHOD_NAMES`]).
            pub fn name(&self) -> &'static str {
                with_method!(self, _c: M => <M as $crate::Method>::NAME)
            }

            /// Whether the method inserts residual (block-output) adapters instead of linear updates.
            pub fn is_residual(&self) -> bool {
                with_method!(self, _c: M => <M as $crate::Method>::RESIDUAL)
            }

            /// The flags that set the method's hyper-parameters, each with what it means here.
            pub fn flags(&self) -> &'static [$crate::FlagField] {
                with_method!(self, _c: M => <M as $crate::Method>::FLAGS)
            }

            /// The flags of the method called `name` (`None` for an unknown name).
            pub fn flags_of(name: &str) -> Option<&'static [$crate::FlagField]> {
                Self::from_name(name).ok().map(|m| m.flags())
            }

            /// See [`Method::default_roles`]($crate::Method::default_roles).
            pub fn default_roles(&self) -> &'static [$crate::AttentionMatrix] {
                with_method!(self, c: M => c.default_roles())
            }

            /// See [`Method::has_zero_init_factor`]($crate::Method::has_zero_init_factor).
            pub fn has_zero_init_factor(&self) -> bool {
                with_method!(self, c: M => c.has_zero_init_factor())
            }

            /// See [`Method::recommended_training`]($crate::Method::recommended_training).
            pub fn recommended_training(&self) -> $crate::RecommendedTraining {
                with_method!(self, c: M => c.recommended_training())
            }

            /// See [`Method::peft_type`]($crate::Method::peft_type).
            pub fn peft_type(&self) -> String {
                with_method!(self, c: M => c.peft_type())
            }

            /// See [`Method::peft_config`]($crate::Method::peft_config).
            pub fn peft_config(&self) -> Option<serde_json::Value> {
                with_method!(self, c: M => c.peft_config())
            }

            /// Reads an `adapter_config.json` written by HF PEFT with this `peft_type` (`None`: no
            /// registered method reads PEFT's files of that type).
            pub fn from_peft_config(peft_type: &str, json: &serde_json::Value) -> Option<$crate::Result<Self>> {
                $(
                    $(#[$aa])*
                    if peft_type == <$any_config>::new().peft_type()
                        && let Some(config) = <$any_config as $crate::Method>::from_peft_config(json)
                    {
                        return Some(config.map(MethodConfig::$any));
                    }
                )*
                None
            }

            fn count_checked(&self, sites: &$crate::Sites) -> $crate::Result<$crate::ParamReport> {
                with_method!(self, c: M => c.count(sites))
            }

            fn build_checked<B: Backend>(
                &self,
                sites: &$crate::Sites,
                device: &B::Device,
            ) -> $crate::Result<$crate::AdapterSet<B>> {
                with_method!(self, c: M => c.build(sites, device))
            }
        }

        impl serde::Serialize for MethodConfig {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                /// The method's name first, then its configuration's fields.
                #[derive(serde::Serialize)]
                struct Tagged<'a, C> {
                    method: &'static str,
                    #[serde(flatten)]
                    config: &'a C,
                }
                with_method!(self, c: M => Tagged { method: <M as $crate::Method>::NAME, config: c }.serialize(serializer))
            }
        }

        impl<'de> serde::Deserialize<'de> for MethodConfig {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                use serde::de::Error;
                let mut fields = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
                let name = match fields.remove("method") {
                    Some(serde_json::Value::String(name)) => name,
                    Some(other) => return Err(D::Error::custom(format!("`method` is {other}, expected a method name"))),
                    None => return Err(D::Error::missing_field("method")),
                };
                let fields = serde_json::Value::Object(fields);
                $(
                    $(#[$aa])*
                    if name == <$any_config as $crate::Method>::NAME {
                        return serde_json::from_value(fields).map(MethodConfig::$any).map_err(D::Error::custom);
                    }
                )*
                Err(D::Error::custom(format!("unknown method `{name}`, expected one of {}", METHOD_NAMES.join(", "))))
            }
        }

        /// Any linear adapter method: what models hold for each adapted projection.
        #[derive(Module, Debug)]
        pub enum LinearAdapter<B: Backend> {
            $(
                #[doc = concat!("[`", stringify!($lin), "`].")]
                $(#[$la])*
                $lin($lin<B>),
            )*
        }

        impl<B: Backend> $crate::LinearDelta<B> for LinearAdapter<B> {
            fn dims(&self) -> (usize, usize) {
                match self { $($(#[$la])* LinearAdapter::$lin(a) => a.dims(),)* }
            }
            fn delta<const D: usize>(&self, x: Tensor<B, D>, shared: &SharedFactors<B>) -> Tensor<B, D> {
                match self { $($(#[$la])* LinearAdapter::$lin(a) => a.delta(x, shared),)* }
            }
            fn low_rank_factors(&self, shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
                match self { $($(#[$la])* LinearAdapter::$lin(a) => a.low_rank_factors(shared),)* }
            }
            fn low_rank_update(&self, tokens: usize, shared: &SharedFactors<B>) -> Option<$crate::LowRankUpdate<B>> {
                match self { $($(#[$la])* LinearAdapter::$lin(a) => a.low_rank_update(tokens, shared),)* }
            }
        }

        $crate::registry::adapter_layer_dispatch!(LinearAdapter { $($(#[$la])* $lin)* });

        /// Adapters applied to a block's output hidden states (`h → h + f(h)`): what models hold at
        /// the Houlsby positions after attention and after the feed-forward network.
        #[derive(Module, Debug)]
        pub enum ResidualAdapter<B: Backend> {
            $(
                #[doc = concat!("[`", stringify!($res), "`].")]
                $(#[$ra])*
                $res($res<B>),
            )*
        }

        impl<B: Backend> ResidualAdapter<B> {
            /// `h + f(h)` for `h: [..., d]`.
            pub fn forward<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
                match self { $($(#[$ra])* ResidualAdapter::$res(a) => $crate::ResidualLayer::forward(a, h),)* }
            }

            /// [`crate::ResidualLayer::dense_reference`]: the map from dense reconstructions.
            pub fn dense_reference<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
                match self { $($(#[$ra])* ResidualAdapter::$res(a) => $crate::ResidualLayer::dense_reference(a, h),)* }
            }

            /// Whether the adapter can be folded into a base weight.
            pub fn merge_supported(&self) -> bool {
                self.merge().is_ok()
            }

            /// Folds nothing: an error that explains why the adapter cannot be merged, if it cannot.
            pub fn merge(&self) -> $crate::Result<()> {
                match self { $($(#[$ra])* ResidualAdapter::$res(a) => $crate::ResidualLayer::merge(a),)* }
            }
        }

        $crate::registry::adapter_layer_dispatch!(ResidualAdapter { $($(#[$ra])* $res)* });

        /// Factors shared by many adapted layers. They exist once, here, at model level, and are
        /// passed to every forward: Burn's optimizer would update only the first copy of a
        /// parameter that appeared twice in the module tree.
        #[derive(Module, Debug)]
        pub struct SharedFactors<B: Backend> {
            $($(
                #[doc = concat!("[`", stringify!($lin), "`]'s shared factors.")]
                pub $lin_field: $lin_shared,
            )?)*
        }

        impl<B: Backend> SharedFactors<B> {
            /// No shared factors.
            pub fn empty() -> Self {
                Self { $($($lin_field: <$lin_shared>::default(),)?)* }
            }
        }

        impl<B: Backend> Default for SharedFactors<B> {
            fn default() -> Self {
                Self::empty()
            }
        }

        impl<B: Backend> $crate::AdapterLayer<B> for SharedFactors<B> {
            fn file_tensors(&mut self) -> Vec<$crate::FileTensor<'_, B>> {
                let mut tensors = Vec::new();
                $($(tensors.extend(self.$lin_field.file_tensors());)?)*
                tensors
            }
            fn zero_init_factors(&self) -> Vec<burn::module::ParamId> {
                let mut ids = Vec::new();
                $($(ids.extend(self.$lin_field.zero_init_factors());)?)*
                ids
            }
        }
    };
    ($($line:tt)*) => {
        $crate::registry::registry!(@sort [] [] [] $($line)*);
    };
}
pub(crate) use registry;

/// Implements [`AdapterLayer`](crate::AdapterLayer) for a registry enum by dispatching to its
/// variants' layers.
macro_rules! adapter_layer_dispatch {
    ($adapter:ident { $($(#[$a:meta])* $variant:ident)* }) => {
        impl<B: Backend> $crate::AdapterLayer<B> for $adapter<B> {
            fn file_tensors(&mut self) -> Vec<$crate::FileTensor<'_, B>> {
                match self { $($(#[$a])* $adapter::$variant(a) => a.file_tensors(),)* }
            }
            fn zero_init_factors(&self) -> Vec<burn::module::ParamId> {
                match self { $($(#[$a])* $adapter::$variant(a) => a.zero_init_factors(),)* }
            }
        }
    };
}
pub(crate) use adapter_layer_dispatch;
