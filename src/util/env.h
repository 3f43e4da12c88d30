#pragma once
// Switches read from the environment (MTA_FLASH_MTA, MTA_FUSED_KQ_LAYER, MTA_FLASH_MIX_CLUSTER, ...): for
// comparisons and tests, not configuration. A misspelt value fails loudly instead of meaning the default.
#include <optional>

namespace mta {

// The 0 / 1 switch `name`: nullopt when unset or empty, false for "0", true for "1"; any other value
// throws InputError naming the variable and the value.
std::optional<bool> env_switch(const char* name);

}  // namespace mta
