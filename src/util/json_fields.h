#pragma once
// Reads the members of one JSON object for a config, naming the field in every error
// ("train.lr: must be in [0, 10] (got -1)"). finish() refuses members that were never read, so a
// typo in a config is an error instead of a silently ignored option.
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

namespace mta {

class FieldReader {
 public:
  FieldReader(const nlohmann::json& j, std::string where);

  const std::string& where() const { return where_; }
  std::string name(const std::string& key) const { return where_ + "." + key; }
  bool has(const std::string& key) const;  // present and not null

  long long integer(const std::string& key, long long lo, long long hi);
  long long integer_or(const std::string& key, long long dflt, long long lo, long long hi);
  double number(const std::string& key, double lo, double hi);
  double number_or(const std::string& key, double dflt, double lo, double hi);
  bool boolean_or(const std::string& key, bool dflt);
  std::string string(const std::string& key);
  std::string string_or(const std::string& key, const std::string& dflt);
  std::string choice_or(const std::string& key, const std::string& dflt, const std::vector<std::string>& allowed);
  const nlohmann::json& object(const std::string& key);  // required object
  const nlohmann::json& raw(const std::string& key);     // any value, marked as read
  void raw_if_present(const std::string& key) { read_.insert(key); }  // accept e.g. an explicit null
  std::vector<int> int_list(const std::string& key);

  void finish() const;  // throws InputError on any member that was not read

 private:
  const nlohmann::json& at(const std::string& key, const char* expected);
  const nlohmann::json& j_;
  std::string where_;
  std::set<std::string> read_;
};

nlohmann::json load_json_file(const std::string& path, const std::string& what);

}  // namespace mta
