#include "util/json_fields.h"

#include <fstream>

#include "util/error.h"

namespace mta {

using json = nlohmann::json;

FieldReader::FieldReader(const json& j, std::string where) : j_(j), where_(std::move(where)) {
  if (!j_.is_object()) throw InputError(where_ + ": must be a JSON object");
}

bool FieldReader::has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }

const json& FieldReader::at(const std::string& key, const char* expected) {
  read_.insert(key);
  if (!has(key)) throw InputError(name(key) + ": missing (" + expected + " is required)");
  return j_[key];
}

long long FieldReader::integer(const std::string& key, long long lo, long long hi) {
  const json& v = at(key, "an integer");
  if (!v.is_number_integer()) throw InputError(name(key) + ": must be an integer (got " + v.dump() + ")");
  const long long x = v.get<long long>();
  if (x < lo || x > hi)
    throw InputError(name(key) + ": must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "] (got " +
                     std::to_string(x) + ")");
  return x;
}

long long FieldReader::integer_or(const std::string& key, long long dflt, long long lo, long long hi) {
  read_.insert(key);
  return has(key) ? integer(key, lo, hi) : dflt;
}

double FieldReader::number(const std::string& key, double lo, double hi) {
  const json& v = at(key, "a number");
  if (!v.is_number()) throw InputError(name(key) + ": must be a number (got " + v.dump() + ")");
  const double x = v.get<double>();
  if (!(x >= lo && x <= hi))
    throw InputError(name(key) + ": must be in [" + json(lo).dump() + ", " + json(hi).dump() + "] (got " + v.dump() + ")");
  return x;
}

double FieldReader::number_or(const std::string& key, double dflt, double lo, double hi) {
  read_.insert(key);
  return has(key) ? number(key, lo, hi) : dflt;
}

bool FieldReader::boolean_or(const std::string& key, bool dflt) {
  read_.insert(key);
  if (!has(key)) return dflt;
  const json& v = j_[key];
  if (!v.is_boolean()) throw InputError(name(key) + ": must be true or false (got " + v.dump() + ")");
  return v.get<bool>();
}

std::string FieldReader::string(const std::string& key) {
  const json& v = at(key, "a string");
  if (!v.is_string()) throw InputError(name(key) + ": must be a string (got " + v.dump() + ")");
  return v.get<std::string>();
}

std::string FieldReader::string_or(const std::string& key, const std::string& dflt) {
  read_.insert(key);
  return has(key) ? string(key) : dflt;
}

std::string FieldReader::choice_or(const std::string& key, const std::string& dflt, const std::vector<std::string>& allowed) {
  const std::string s = string_or(key, dflt);
  for (const auto& a : allowed)
    if (s == a) return s;
  std::string list;
  for (const auto& a : allowed) list += (list.empty() ? "\"" : ", \"") + a + "\"";
  throw InputError(name(key) + ": must be one of " + list + " (got \"" + s + "\")");
}

const json& FieldReader::object(const std::string& key) {
  const json& v = at(key, "an object");
  if (!v.is_object()) throw InputError(name(key) + ": must be a JSON object (got " + v.dump() + ")");
  return v;
}

const json& FieldReader::raw(const std::string& key) {
  read_.insert(key);
  if (!j_.contains(key)) throw InputError(name(key) + ": missing");
  return j_[key];
}

std::vector<int> FieldReader::int_list(const std::string& key) {
  const json& v = at(key, "a list of integers");
  if (!v.is_array()) throw InputError(name(key) + ": must be a list of integers (got " + v.dump() + ")");
  std::vector<int> out;
  for (const auto& e : v) {
    if (!e.is_number_integer()) throw InputError(name(key) + ": must be a list of integers (got " + v.dump() + ")");
    out.push_back(e.get<int>());
  }
  return out;
}

void FieldReader::finish() const {
  for (auto it = j_.begin(); it != j_.end(); ++it) {
    if (read_.count(it.key())) continue;
    std::string list;
    for (const auto& k : read_) list += (list.empty() ? "" : ", ") + k;
    throw InputError(name(it.key()) + ": unknown field (known here: " + list + ")");
  }
}

json load_json_file(const std::string& path, const std::string& what) {
  std::ifstream f(path);
  if (!f) throw InputError(what + " " + path + ": cannot be opened");
  try {
    return json::parse(f);
  } catch (const json::parse_error& e) {
    throw InputError(what + " " + path + ": not valid JSON (" + e.what() + ")");
  }
}

}  // namespace mta
