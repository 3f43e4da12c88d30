// util/env.h: the 0 / 1 switches read from the environment.
#include <gtest/gtest.h>

#include <cstdlib>

#include "util/env.h"
#include "util/error.h"

TEST(EnvSwitch, ZeroOneUnsetAndBadValues) {
  const char* name = "MTA_TEST_ENV_SWITCH";
  unsetenv(name);
  EXPECT_EQ(mta::env_switch(name), std::nullopt);
  setenv(name, "", 1);
  EXPECT_EQ(mta::env_switch(name), std::nullopt);
  setenv(name, "0", 1);
  EXPECT_EQ(mta::env_switch(name), false);
  setenv(name, "1", 1);
  EXPECT_EQ(mta::env_switch(name), true);
  for (const char* bad : {"yes", "2", "true", " 1"}) {
    setenv(name, bad, 1);
    try {
      mta::env_switch(name);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const mta::InputError& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();  // names the variable
    }
  }
  unsetenv(name);
}
